"""General text (corpus windows, cached model samples) and side-effect evals (text CE/accuracy/KL, MMLU)."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import save_hf_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import jaxedit
from jaxedit.data import text
from jaxedit.errors import JaxeditError
from jaxedit.eval import side_effects
from jaxedit.models.decode import decode_step, generate, sample_inverse_cdf
from jaxedit.readout import logits_after

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0-3, as in the tiny HF configs
WORDS = ("A B C D . , : ? Answer The following are multiple choice questions with answers about abstract algebra "
         "high school biology what is the of a an cell group ring field which one two three four five six seven "
         "eight nine ten red blue green cat dog sun moon tree fish bird runs eats sees big small").split()
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}


def _ids(words: str) -> list[int]:
    return [VOCAB[w] for w in words.split()]


def _write_tokenizer(directory):
    """A word-level tokenizer (whitespace/punctuation split, BOS added) with the tiny models' special ids."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))


def _tiny(tmp_path_factory, family):
    directory = tmp_path_factory.mktemp(family)
    save_hf_model(family, directory)
    _write_tokenizer(directory)
    return jaxedit.load(directory)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return _tiny(tmp_path_factory, "gemma3")


@pytest.fixture(scope="module")
def tokenizer(gemma3):
    return gemma3.tokenizer


# ---------------------------------------------------------------- corpus windows

DOCS = ["red blue green", "one two three four five six seven eight nine", "cat dog"]


def _expected_windows(ctx):
    """Hand-built windows for DOCS with ctx=5 (BOS + 4): short docs padded, the 9-token doc gives 2 full windows."""
    assert ctx == 5
    rows = [[1] + _ids("red blue green") + [0], [1] + _ids("one two three four"), [1] + _ids("five six seven eight"),
            [1] + _ids("cat dog") + [0, 0]]
    masks = [[1, 1, 1, 1, 0], [1] * 5, [1] * 5, [1, 1, 1, 0, 0]]
    return {(tuple(r), tuple(m)) for r, m in zip(rows, masks)}


def _as_set(tokens, mask):
    return {(tuple(r), tuple(m)) for r, m in zip(tokens.tolist(), mask.tolist())}


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "dir"])
def test_corpus_windows_equal_hand_built(tmp_path, tokenizer, fmt):
    if fmt == "txt":
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(DOCS[:2]) + "\n  \n\n" + DOCS[2] + "\n\n\n")
    elif fmt == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n")
    else:
        path = tmp_path / "docs"
        path.mkdir()
        for i, d in enumerate(DOCS):
            (path / f"{i}.txt").write_text(d.replace(" ", "\n\n", 1))  # one file = one document, blank lines kept
    tokens, mask = text.load_corpus(path, tokenizer, None, ctx=5)
    assert tokens.dtype == mask.dtype == np.int32 and tokens.shape == (4, 5)
    assert _as_set(tokens, mask) == _expected_windows(5)
    some, some_mask = text.load_corpus(path, tokenizer, 2, ctx=5, seed=3)
    assert some.shape == (2, 5) and len(_as_set(some, some_mask)) == 2
    assert _as_set(some, some_mask) <= _expected_windows(5)
    again = text.load_corpus(path, tokenizer, 2, ctx=5, seed=3)
    np.testing.assert_array_equal(again[0], some)


def test_corpus_seeds_choose_different_windows(tmp_path, tokenizer):
    path = tmp_path / "many.txt"
    path.write_text("\n\n".join(" ".join(WORDS[i:i + 3]) for i in range(40)))
    chosen = {tuple(map(tuple, text.load_corpus(path, tokenizer, 5, ctx=6, seed=s)[0])) for s in range(4)}
    assert len(chosen) == 4


def test_corpus_bad_inputs_one_line_errors(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "cat"}) + "\n" + json.dumps({"body": "dog"}) + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(bad, "line 2"), (tmp_path / "missing.txt", "no corpus"), (empty, "no .txt files")]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "cat"}\n{"text": \n')
    cases.append((broken, "line 2"))
    small = tmp_path / "small.txt"
    small.write_text("cat dog\n\nred")
    for path, needle in cases:
        with pytest.raises(JaxeditError, match=needle) as err:
            text.load_corpus(path, tokenizer, 1, ctx=5)
        assert "\n" not in str(err.value)
    with pytest.raises(JaxeditError, match="only 2 windows"):
        text.load_corpus(small, tokenizer, 3, ctx=5)


def test_lm_batches_cycle_shuffles():
    tokens = np.arange(5 * 3, dtype=np.int32).reshape(5, 3)
    mask = np.ones_like(tokens)
    batches = text.lm_batches(tokens, mask, batch_size=2, n_batches=5, seed=0)
    rows = np.concatenate([np.asarray(batches(i)["tokens"]) for i in range(5)])[:, 0] // 3
    assert sorted(rows[:5]) == sorted(rows[5:10]) == list(range(5))  # each pass is a permutation
    np.testing.assert_array_equal(batches(5)["tokens"], batches(0)["tokens"])
    assert batches(0)["mask"].shape == (2, 3)


# ---------------------------------------------------------------- sampling


def _greedy_reference(model, prefix, ctx):
    """Greedy continuation by full forwards (Python loop, argmax at position t of a fixed causal buffer)."""
    tokens = np.zeros((1, ctx), np.int32)
    tokens[0, :len(prefix)] = prefix
    for t in range(len(prefix) - 1, ctx - 1):
        logits, _ = model.forward(jnp.asarray(tokens))
        tokens[0, t + 1] = int(np.argmax(np.asarray(logits[0, t])))
    return tokens[0]


@pytest.fixture(scope="module", params=["gemma3", "gpt2"])
def family_model(request, tmp_path_factory):
    """gemma3: sliding window 4 < T, soft-caps, qk-norm, post-norms, GQA; gpt2: learned positions, LayerNorm, biases."""
    return _tiny(tmp_path_factory, request.param)


def test_cached_decode_logits_equal_full_forward(family_model):
    model, t = family_model, 12
    tokens = np.random.default_rng(0).integers(3, 96, (2, t)).astype(np.int32)
    want, _ = model.forward(jnp.asarray(tokens))
    shape = (model.cfg.n_layers, 2, t, model.cfg.n_kv_heads, model.cfg.head_dim)
    cache = (jnp.zeros(shape), jnp.zeros(shape))
    step = jax.jit(decode_step, static_argnums=0)
    for i in range(t):
        logits, cache = step(model.cfg, model.params, jnp.asarray(tokens[:, i]), i, cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want[:, i]), atol=2e-5, rtol=1e-5)


def test_greedy_sample_equals_loop_of_full_forwards(family_model):
    model, ctx = family_model, 12
    stop_ids = jnp.asarray([-1], jnp.int32)
    for prefix in ([1], [1] + _ids("the cat runs big fish")):
        want = _greedy_reference(model, prefix, ctx)
        buffer = np.zeros((2, ctx), np.int32)
        buffer[:, :len(prefix)] = prefix
        got, mask = generate(model.params, buffer, len(prefix), jax.random.split(jax.random.key(0), 2), stop_ids, 0,
                             model.cfg, 0.0)
        np.testing.assert_array_equal(np.asarray(got), [want, want])
        assert np.asarray(mask).all()
    # a stop token ends the row: kept with mask 1, the rest padded and masked
    stop_at = len(prefix) + 3
    got, mask = generate(model.params, buffer, len(prefix), jax.random.split(jax.random.key(0), 2),
                         jnp.asarray([want[stop_at]], jnp.int32), 0, model.cfg, 0.0)
    first = len(prefix) + list(want[len(prefix):]).index(want[stop_at])
    expected_mask = (np.arange(ctx) <= first).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(mask)[0], expected_mask)
    np.testing.assert_array_equal(np.asarray(got)[0], np.where(expected_mask, want, 0))


def test_sampled_first_token_follows_tempered_softmax(gemma3):
    temperature = 0.7
    tokens, mask = text.sample_text(gemma3, 3000, ctx=2, seed=1, temperature=temperature, batch_size=1000, cache=False)
    assert (tokens[:, 0] == 1).all() and mask.all()
    logits, _ = gemma3.forward(jnp.asarray([[1]]))
    z = np.asarray(logits[0, 0], np.float64) / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    freq = np.bincount(tokens[:, 1], minlength=len(probs)) / len(tokens)
    assert np.abs(freq - probs).max() < 0.03  # sampling error of 3000 draws is < 0.01


def test_seeded_sample_reproducible_and_batch_independent(gemma3):
    a = text.sample_text(gemma3, 5, ctx=8, seed=4, batch_size=2, cache=False)
    b = text.sample_text(gemma3, 5, ctx=8, seed=4, batch_size=5, cache=False)
    c = text.sample_text(gemma3, 5, ctx=8, seed=5, batch_size=2, cache=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (5, 8) and not np.array_equal(a[0], c[0])
    assert (a[0][a[1] == 0] == gemma3.tokenizer.pad_token_id).all()
    assert len({tuple(r) for r in a[0].tolist()}) > 1  # rows get their own keys


def test_sample_cache_file_is_reused(gemma3, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path))
    tokens, mask = text.sample_text(gemma3, 3, ctx=8, seed=0, batch_size=2, prompt="the cat")
    files = list((tmp_path / "text").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "text").glob(".*"))  # no temporary left behind
    np.testing.assert_array_equal(tokens[:, :3], [[1] + _ids("the cat")] * 3)
    marker = np.full_like(tokens, 7)
    np.savez(files[0], tokens=marker, mask=mask)
    again, _ = text.sample_text(gemma3, 3, ctx=8, seed=0, batch_size=2, prompt="the cat")
    np.testing.assert_array_equal(again, marker)  # read from the file, not sampled again
    compiled = generate._cache_size()
    text.sample_text(gemma3, 3, ctx=8, seed=1, batch_size=2, prompt="the big cat")
    text.sample_text(gemma3, 5, ctx=8, seed=1, batch_size=2)
    assert len(list((tmp_path / "text").glob("*.npz"))) == 3
    assert generate._cache_size() == compiled  # other prompts, seeds and n reuse the one program


def test_sample_bad_inputs(gemma3):
    with pytest.raises(JaxeditError, match="prompt has"):
        text.sample_text(gemma3, 2, ctx=3, prompt="the cat runs", cache=False)
    with pytest.raises(JaxeditError, match="temperature"):
        text.sample_text(gemma3, 2, temperature=-1.0, cache=False)


# ---------------------------------------------------------------- general-text metrics


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def windows():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 90, (5, 7)).astype(np.int32)
    lengths = [7, 7, 4, 2, 6]
    mask = (np.arange(7)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask, tokens, 0), mask


def test_ce_accuracy_kl_equal_numpy_loop(gemma3, windows):
    tokens, mask = windows
    rng = np.random.default_rng(1)
    edited = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32), gemma3.params)
    got = side_effects.general_text_metrics(gemma3, tokens, mask, params=edited, reference_params=gemma3.params,
                                            batch_size=2)
    new = _log_softmax(gemma3.forward(jnp.asarray(tokens), edited, attention_mask=jnp.asarray(mask))[0])
    ref = _log_softmax(gemma3.forward(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
    ce, correct, kl, n_next, n_real = 0.0, 0, 0.0, 0, 0
    for b in range(len(tokens)):
        for t in range(tokens.shape[1]):
            if not mask[b, t]:
                continue
            kl += float(np.sum(np.exp(ref[b, t]) * (ref[b, t] - new[b, t])))
            n_real += 1
            if t + 1 < tokens.shape[1] and mask[b, t + 1]:
                ce -= new[b, t, tokens[b, t + 1]]
                correct += int(np.argmax(new[b, t]) == tokens[b, t + 1])
                n_next += 1
    assert got["tokens"] == n_next == 6 + 6 + 3 + 1 + 5
    assert got["ce"] == pytest.approx(ce / n_next, rel=1e-5)
    assert got["accuracy"] == pytest.approx(correct / n_next)
    assert got["kl"] == pytest.approx(kl / n_real, rel=1e-4)
    assert got["kl"] > 1e-3


def test_kl_is_zero_for_identical_params(gemma3, windows):
    got = side_effects.general_text_metrics(gemma3, *windows, reference_params=gemma3.params, batch_size=2)
    assert abs(got["kl"]) < 1e-6


# ---------------------------------------------------------------- MMLU

MMLU = {
    "abstract_algebra": [["what is the field of two ?", "one", "two", "a ring", "a group, of three"],
                         ["which group is big ?", "ten", "six", "nine", "four"],
                         ["what is a ring", "the cat", "the dog", "the fish", "the bird"]],
    "high_school_biology": [["what is a cell ?", "red", "blue", "green", "\"big\" tree"],
                            ["which one eats ?", "cat", "sun", "moon", "tree"]],
}
ANSWERS = {"abstract_algebra": ["A", "C", "D"], "high_school_biology": ["B", "A"]}
DEV = {"abstract_algebra": [["the sun is ?", "big", "small", "red", "blue"],
                            ["a dog runs ?", "one", "two", "ten", "six"]],
       "high_school_biology": [["what eats fish ?", "bird", "sun", "moon", "tree"]]}


def _write_mmlu(root):
    for split, data in (("test", MMLU), ("dev", DEV)):
        (root / split).mkdir(parents=True)
        for subject, rows in data.items():
            letters = ANSWERS[subject] if split == "test" else ["B"] * len(rows)
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as f:
                csv.writer(f).writerows([row + [a] for row, a in zip(rows, letters)])
    return root


def _reference_prompt(subject, row, shots):
    """lm-eval's mmlu template, written out by hand."""
    def q(r):
        return f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"
    topic = {"abstract_algebra": "abstract algebra", "high_school_biology": "high school biology"}[subject]
    head = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    return head + "".join(q(s) + " B\n\n" for s in shots) + q(row)


def test_mmlu_prompt_is_lm_eval_format():
    row = MMLU["abstract_algebra"][0] + ["A"]
    assert side_effects.mmlu_prompt("abstract_algebra", row) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "what is the field of two ?\nA. one\nB. two\nC. a ring\nD. a group, of three\nAnswer:")


@pytest.mark.parametrize("k_shot, limit", [(0, None), (1, 2)])
def test_mmlu_accuracy_equals_question_loop(gemma3, tmp_path, k_shot, limit):
    root = _write_mmlu(tmp_path / "mmlu")
    edited = jax.tree.map(lambda p: np.asarray(p) * 1.1, gemma3.params)
    got = side_effects.evaluate_mmlu(gemma3, root, params=edited, k_shot=k_shot, limit=limit, batch_size=2)
    letter_ids = [VOCAB[letter] for letter in "ABCD"]
    asked = [(subject, row, answer) for subject, rows in MMLU.items()
             for row, answer in list(zip(rows, ANSWERS[subject]))[:limit]]
    prompts = [_reference_prompt(subject, row, DEV[subject][:k_shot]) for subject, row, _ in asked]
    logits = logits_after(gemma3, prompts, params=edited)  # one padded batch, in file order
    hits = ["ABCD"[int(np.argmax(row[letter_ids]))] == answer for row, (_, _, answer) in zip(logits, asked)]
    per_subject = {s: float(np.mean([h for h, (subject, _, _) in zip(hits, asked) if subject == s])) for s in MMLU}
    assert got["questions"] == len(hits) == (5 if limit is None else 4)
    assert got["subjects"] == pytest.approx(per_subject)
    assert got["accuracy"] == pytest.approx(np.mean(hits))


def test_mmlu_bad_layout_one_line_errors(gemma3, tmp_path):
    with pytest.raises(JaxeditError, match=r"expected <dir>/test/<subject>_test\.csv") as err:
        side_effects.evaluate_mmlu(gemma3, tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    root = _write_mmlu(tmp_path / "mmlu")
    with pytest.raises(JaxeditError, match="no MMLU test file for"):
        side_effects.evaluate_mmlu(gemma3, root, subjects=["anatomy"])
    with pytest.raises(JaxeditError, match="fewer than k_shot=2"):
        side_effects.evaluate_mmlu(gemma3, root, k_shot=2)
    (root / "test" / "anatomy_test.csv").write_text("what is a cell ?,red,blue,green,tree,E\n")
    with pytest.raises(JaxeditError, match="row 1 of .*anatomy_test.csv") as err:
        side_effects.evaluate_mmlu(gemma3, root)
    assert "\n" not in str(err.value)


def test_inverse_cdf_sampler_hand_cases():
    logits = jnp.log(jnp.asarray([[0.0, 0.25, 0.0, 0.75]] * 4))
    got = sample_inverse_cdf(logits, jnp.asarray([0.0, 0.2499, 0.25, 0.9999999]))
    np.testing.assert_array_equal(np.asarray(got), [1, 1, 3, 3])  # zero-probability tokens are never drawn
