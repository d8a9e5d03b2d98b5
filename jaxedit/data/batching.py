"""Length buckets: pad prompts to a few lengths so a dataset compiles a handful of programs."""

from __future__ import annotations

import numpy as np

from jaxedit.tokenizer import pad

MIN_BUCKET = 16


def bucket_length(n_tokens: int) -> int:
    """The smallest power of two ≥ n_tokens (at least MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << (max(n_tokens, 1) - 1).bit_length())


def padded_batches(rows: list[list[int]], pad_id: int, batch_size: int, padding_side: str = "right"):
    """Yield (start index, ids [B,T], mask [B,T]) with T a bucket length and B = batch_size (last batch padded with copies)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # constant batch shape: one compile
        ids, mask = pad(chunk, pad_id, padding_side, bucket_length(max(len(r) for r in chunk)))
        yield start, ids, mask


def first_tokens(tokenizer, answers: list[str]) -> np.ndarray:
    """Id [C] of the first token of each answer string (answers are scored by their first token)."""
    return np.array([tokenizer.encode(a, add_special_tokens=False)[0] for a in answers], np.int32)
