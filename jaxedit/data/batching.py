"""Length buckets: pad prompts to a few lengths so a dataset compiles a handful of programs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.tokenizer import pad

MIN_BUCKET = 8
_STEPS = ((32, 4), (128, 8), (512, 32))  # (up to n tokens, bucket step); beyond the last: steps of 128


def bucket_length(n_tokens: int) -> int:
    """n_tokens rounded up to a bucket: a multiple of 4 up to 32, of 8 up to 128, of 32 up to 512, then of 128
    (≥ MIN_BUCKET).

    Fine steps keep padding waste small (the rest of a fact prompt after its template head, 6–11 tokens,
    pads to 12, not 16) while a dataset of similar prompts still compiles a handful of programs.
    """
    step = next((s for limit, s in _STEPS if n_tokens <= limit), 128)
    return max(MIN_BUCKET, -(-max(n_tokens, 1) // step) * step)


def fixed_batches(n: int, batch_size: int):
    """Yield (start, rows [batch_size] int, n_real) over n rows: indices start.., past n-1 repeated as n-1.

    Every batch has the same shape (one compile); outputs of the n_real first rows are the real ones.
    """
    for start in range(0, n, batch_size):
        yield start, np.minimum(np.arange(start, start + batch_size), n - 1), min(batch_size, n - start)


def fitted_batch_size(n: int, batch_size: int) -> int:
    """The batch size ≤ batch_size that covers n rows in as few batches, with the least padding, rounded up to a
    multiple of 4 (a few shapes per dataset): 40 rows at batch_size 32 run as 2 × 20, not 2 × 32."""
    if n <= 0:
        return batch_size
    per = -(-n // -(-n // batch_size))
    return min(batch_size, -(-per // 4) * 4)


def padded_batches(rows: list[list[int]], pad_id: int, batch_size: int, padding_side: str = "right"):
    """Yield (start, rows [B] int, n_real, ids [B,T], mask [B,T]) of `fixed_batches`, T a bucket length of the batch."""
    for start, index, n_real in fixed_batches(len(rows), batch_size):
        chunk = [rows[i] for i in index]
        ids, mask = pad(chunk, pad_id, padding_side, bucket_length(max(len(r) for r in chunk)))
        yield start, index, n_real, ids, mask


def cycling_order(permutation, n: int, need: int) -> np.ndarray:
    """[need] row indices: shuffles `permutation(n)` (e.g. a seeded `rng.permutation`) one after another."""
    return np.concatenate([permutation(n) for _ in range(-(-need // n))])[:need]


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading token ids all rows share, leaving each row at least one of its own (0 for one row)."""
    if len(rows) < 2:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def first_tokens(tokenizer, answers: list[str]) -> np.ndarray:
    """Id [C] of the first token of each answer string (answers are scored by their first token)."""
    return np.array([tokenizer.encode(a, add_special_tokens=False)[0] for a in answers], np.int32)


class PromptBatches:
    """Training micro-batches of prompts with next-token targets, cycling seeded shuffles of each set.

    sets: {key: (prompts [N] str, targets [N] int token ids)}, e.g. {'forget': ..., 'maintain': ...}.
    `self(i)` is micro-batch i: {key: {'tokens' [B,T], 'mask' [B,T], 'target' [B]}} with one bucket
    length T for every key and step (one compile). Right padding; the target is read at the last
    real position. Empty sets are dropped. When every prompt starts with the same S tokens (a
    template's head), tokens hold only the rest and each key also has 'prefix' [S] (those ids; the
    forward runs them once, `core.forward_shared_prefix`).
    """

    def __init__(self, tokenizer, sets: dict, batch_size: int, n_batches: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        encoded = {key: ([tokenizer.encode(p) for p in prompts], np.asarray(targets, np.int32))
                   for key, (prompts, targets) in sets.items() if len(prompts)}
        if not encoded:
            raise JaxeditError("no facts to train on: give at least one non-empty fact set")
        every = [r for rows, _ in encoded.values() for r in rows]
        shared = shared_prefix_length(every)
        self.prefix = np.asarray(every[0][:shared], np.int32) if shared else None
        encoded = {key: ([r[shared:] for r in rows], target) for key, (rows, target) in encoded.items()}
        length = bucket_length(max(len(r) - shared for r in every))
        need = batch_size * n_batches
        self.batch_size, self.data = batch_size, {}
        for key, (rows, target) in encoded.items():
            order = cycling_order(rng.permutation, len(rows), need)
            tokens, mask = pad(rows, tokenizer.pad_token_id, "right", length)
            self.data[key] = (tokens, mask, target, order)

    def __call__(self, i: int) -> dict:
        out = {}
        for key, (tokens, mask, target, order) in self.data.items():
            rows = order[i * self.batch_size:(i + 1) * self.batch_size]
            out[key] = {"tokens": jnp.asarray(tokens[rows]), "mask": jnp.asarray(mask[rows]),
                        "target": jnp.asarray(target[rows])}
            if self.prefix is not None:
                out[key]["prefix"] = jnp.asarray(self.prefix)
        return out
