"""`PromptBatches` and length buckets: every fact once per epoch, one fixed shape, the template head shared."""

import numpy as np
import pytest

from jaxedit.data.batching import MIN_BUCKET, PromptBatches, bucket_length, fitted_batch_size
from jaxedit.errors import JaxeditError
from jaxedit.tokenizer import Tokenizer

HEAD = "Fact: in the sports pages, the athlete"
FORGET = [f"{HEAD} {name} plays" for name in ("Michael Jordan", "Tom Brady", "Serena", "Lionel Messi", "Babe Ruth")]
MAINTAIN = [f"{HEAD} {name} is known for" for name in ("LeBron James", "Aaron Judge", "Wayne Gretzky",
                                                       "Patrick Mahomes", "a very long name " * 4, "Pele", "Ali")]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer(smollm2_dir)


def _rows(tokenizer, batch: dict) -> list[int]:
    """The prompt index (in FORGET + MAINTAIN) of each row: prefix + the row's real tokens, matched by hand."""
    prompts = {tuple(tokenizer.encode(p)): i for i, p in enumerate(FORGET + MAINTAIN)}
    prefix = [int(t) for t in np.asarray(batch["prefix"])]
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    return [prompts[tuple(prefix + row[m.astype(bool)].tolist())] for row, m in zip(tokens, mask)]


def test_every_fact_once_per_epoch_with_its_target_in_one_fixed_shape(tokenizer):
    forget_targets, maintain_targets = np.arange(100, 105), np.arange(200, 207)
    sets = {"forget": (FORGET, forget_targets), "maintain": (MAINTAIN, maintain_targets)}
    b, n_batches = 2, 9
    batches = PromptBatches(tokenizer, sets, batch_size=b, n_batches=n_batches, seed=3)
    head = len(tokenizer.encode(HEAD))  # every prompt starts with these tokens (the BOS and the template head)
    longest = max(len(tokenizer.encode(p)) for p in FORGET + MAINTAIN) - head
    shapes, drawn = set(), {"forget": [], "maintain": []}
    for i in range(n_batches):
        batch = batches(i)
        for key, offset, targets in (("forget", 0, forget_targets), ("maintain", len(FORGET), maintain_targets)):
            part = batch[key]
            shapes.add((part["tokens"].shape, part["mask"].shape, part["target"].shape, part["prefix"].shape))
            rows = _rows(tokenizer, part)
            assert all(offset <= r < offset + len(targets) for r in rows)
            np.testing.assert_array_equal(part["target"], targets[np.array(rows) - offset])  # each its own target
            drawn[key] += [r - offset for r in rows]
    step = 4 if longest <= 32 else 8
    t = max(MIN_BUCKET, -(-longest // step) * step)  # the bucket above the longest rest, by hand
    assert shapes == {((b, t), (b, t), (b,), (head,))}
    for key, n in (("forget", len(FORGET)), ("maintain", len(MAINTAIN))):
        order = drawn[key]
        assert len(order) == b * n_batches
        for start in range(0, len(order) - n + 1, n):  # every complete epoch holds every fact exactly once
            assert sorted(order[start:start + n]) == list(range(n)), (key, order)
        assert len(set(order[len(order) // n * n:])) == len(order) % n  # the partial epoch: no repeat
    again = PromptBatches(tokenizer, sets, batch_size=b, n_batches=n_batches, seed=3)
    other = PromptBatches(tokenizer, sets, batch_size=b, n_batches=n_batches, seed=4)
    assert all(_rows(tokenizer, again(i)["forget"]) == _rows(tokenizer, batches(i)["forget"]) for i in range(9))
    assert any(_rows(tokenizer, other(i)["forget"]) != _rows(tokenizer, batches(i)["forget"]) for i in range(9))


def test_prompts_without_a_common_head_keep_every_token_and_empty_sets_are_dropped(tokenizer):
    prompts = ["Alpha plays", "Beta is a", "Gamma"]
    batches = PromptBatches(tokenizer, {"forget": (prompts, [5, 6, 7]), "maintain": ([], [])}, 3, 1)
    batch = batches(0)
    assert set(batch) == {"forget"}
    encoded = [tokenizer.encode(p) for p in prompts]
    bos = 1 if len({e[0] for e in encoded}) == 1 else 0  # a shared BOS is the only shared head
    assert batch["forget"].get("prefix") is None or batch["forget"]["prefix"].shape == (bos,)
    tokens, mask = np.asarray(batch["forget"]["tokens"]), np.asarray(batch["forget"]["mask"])
    got = sorted(tuple(r[m.astype(bool)].tolist()) for r, m in zip(tokens, mask))
    assert got == sorted(tuple(e[bos:]) for e in encoded)
    with pytest.raises(JaxeditError, match="no facts"):
        PromptBatches(tokenizer, {"forget": ([], [])}, 2, 1)


@pytest.mark.parametrize("n, want", [(0, 8), (1, 8), (9, 12), (16, 16), (17, 20), (31, 32), (33, 40), (120, 120),
                                     (128, 128), (129, 160), (512, 512), (513, 640), (700, 768)])
def test_bucket_length_by_hand(n, want):
    assert bucket_length(n) == want


@pytest.mark.parametrize("n, batch_size, want", [(40, 32, 20), (40, 64, 40), (32, 32, 32), (33, 32, 20), (112, 32, 28),
                                                 (5, 16, 8), (3, 1, 1), (100, 30, 28), (0, 16, 16)])
def test_fitted_batch_size_by_hand(n, batch_size, want):
    """As few batches as batch_size allows, each as small as covers n, rounded up to a multiple of 4."""
    assert fitted_batch_size(n, batch_size) == want
