"""Clean/corrupt prompt pairs aligned token by token, and subject-embedding noise.

Resampling (the paper's AP / path-patching corruption): the subject's tokens are replaced by
random ASCII-word tokens, resampled (seeded) until the corrupted prompt re-tokenizes to exactly
the same length with every non-subject token unchanged, so clean and corrupt rows align.
Noise (causal tracing): Gaussian noise on the subject's token embeddings, scaled as ROME does
(3 × std of the subject embeddings) or as the paper's code does (sqrt(3 × std) per example, method.md §3.4,
§10.4).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.tokenizer import Tokenizer, pad

_WORD = re.compile(r"^ ?[A-Za-z]{2,}$")
NOISE_KINDS = ("rome", "paper")  # `noise_scale`


@dataclasses.dataclass(frozen=True)
class PromptPairs:
    """A padded batch of clean prompts with aligned corrupted twins. Arrays are numpy [B,T]."""

    clean: np.ndarray  # int32 token ids
    corrupt: np.ndarray  # int32 token ids, differing from clean only where `subject` is True
    mask: np.ndarray  # int32 attention mask
    subject: np.ndarray  # bool: the subject's token positions


def subject_positions(tokenizer: Tokenizer, prompt: str, subject: str) -> tuple[list[int], list[int]]:
    """(token ids of the prompt, indices of the tokens that overlap the subject's characters)."""
    start = prompt.find(subject)
    if start < 0:
        raise JaxeditError(f"subject {subject!r} does not occur in prompt {prompt!r}: fix the data row")
    end = start + len(subject)
    ids, offsets = tokenizer.encode_with_offsets(prompt)
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return ids, hits


def _word_tokens(tokenizer: Tokenizer) -> np.ndarray:
    """Ids of tokens that decode to one ASCII word (optionally with a leading space)."""
    return np.array([i for i in range(tokenizer.vocab_size) if _WORD.match(tokenizer.decode([i]) or "")])


def resample_subjects(
    tokenizer: Tokenizer,
    prompts: list[str],
    subjects: list[str],
    seed: int = 0,
    padding_side: str = "left",
    length: int | None = None,
    max_tries: int = 200,
) -> PromptPairs:
    """Clean prompts and subject-resampled corrupt prompts of identical tokenization length."""
    rng = np.random.default_rng(seed)
    words = _word_tokens(tokenizer)
    clean_rows, corrupt_rows, subject_rows = [], [], []
    for prompt, subject in zip(prompts, subjects, strict=True):
        ids, hits = subject_positions(tokenizer, prompt, subject)
        corrupt = _resample_one(tokenizer, prompt, subject, ids, hits, words, rng, max_tries)
        clean_rows.append(ids)
        corrupt_rows.append(corrupt)
        subject_rows.append([int(i in hits) for i in range(len(ids))])
    clean, mask = pad(clean_rows, tokenizer.pad_token_id, padding_side, length)
    corrupt, _ = pad(corrupt_rows, tokenizer.pad_token_id, padding_side, length)
    subject, _ = pad(subject_rows, 0, padding_side, length)
    return PromptPairs(clean, corrupt, mask, subject.astype(bool))


def _resample_one(tokenizer, prompt, subject, ids, hits, words, rng, max_tries) -> list[int]:
    start = prompt.find(subject)
    for _ in range(max_tries):
        new = rng.choice(words, size=len(hits))
        text = tokenizer.decode(new).strip()
        corrupted = tokenizer.encode(prompt[:start] + text + prompt[start + len(subject):])
        same_elsewhere = all(corrupted[i] == ids[i] for i in range(len(ids)) if i not in hits) if len(corrupted) == len(ids) else False
        if same_elsewhere and any(corrupted[i] != ids[i] for i in hits):
            return corrupted
    raise JaxeditError(f"could not resample subject {subject!r} to {len(hits)} tokens in {max_tries} tries: "
                       "raise max_tries or drop this prompt")


def noise_scale(embed_table: jax.Array, tokens: np.ndarray, subject: np.ndarray, kind: str = "rome",
                embed_scale: float = 1.0) -> np.ndarray:
    """Std [B] of each example's Gaussian noise (tokens, subject: [B,T]), from the subject tokens' embeddings.

    'rome' = 3·std of every subject embedding of the batch (one number); 'paper' = sqrt(3·std) of the
    example's own subject embeddings (the paper's localizer, §3.4).
    """
    table = jnp.asarray(embed_table)

    def std(ids):
        return float(jnp.std(table[jnp.asarray(ids)].astype(jnp.float32))) * embed_scale

    tokens, subject = np.asarray(tokens), np.asarray(subject, bool)
    if kind == "rome":
        return np.full(len(tokens), 3.0 * std(tokens[subject]), np.float32)
    if kind == "paper":
        return np.sqrt(3.0 * np.array([std(row[hit]) for row, hit in zip(tokens, subject)])).astype(np.float32)
    raise JaxeditError(f"unknown noise kind {kind!r}: use one of {', '.join(NOISE_KINDS)}")


def subject_noise(key: jax.Array, subject: jax.Array, d_model: int, scale, samples: int | None = None) -> jax.Array:
    """Gaussian noise [(N,)B,T,D] on the subject positions (zero elsewhere), for an `embed` delta.

    scale: the std, one number or one per example [B] (`noise_scale`)."""
    shape = subject.shape + (d_model,) if samples is None else (samples,) + subject.shape + (d_model,)
    per_example = jnp.reshape(jnp.asarray(scale, jnp.float32), (-1, 1, 1))
    return jax.random.normal(key, shape) * per_example * subject[..., None]
