"""Metrics on last-position logits [B,V] (pure, jittable). B batch, V vocab, C candidates."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """logits [B,V] at ids [B] -> [B], or at ids [B,C] -> [B,C]."""
    if ids.ndim == 1:
        return jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
    return jnp.take_along_axis(logits, ids, axis=-1)


def logit_diff(logits: jax.Array, answer: jax.Array, others: jax.Array) -> jax.Array:
    """[B]: logit of the answer [B] minus the mean logit of `others` ([B,C] candidates, or [B] one counterfactual)."""
    other = gather(logits, others)
    return gather(logits, answer) - (other.mean(-1) if other.ndim == 2 else other)


def normalized(metric: jax.Array, clean: jax.Array, corrupt: jax.Array) -> jax.Array:
    """(m − m_corrupt) / (m_clean − m_corrupt): 1 at the clean value, 0 at the corrupted one."""
    return (metric - corrupt) / (clean - corrupt)


def answer_prob(logits: jax.Array, answer: jax.Array, candidates: jax.Array | None = None) -> jax.Array:
    """[B]: probability of the answer, softmax over the candidate ids [B,C] or the full vocabulary."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if candidates is None:
        return jnp.exp(gather(logits, answer) - jax.nn.logsumexp(logits, axis=-1))
    restricted = gather(logits, candidates)
    return jnp.exp(gather(logits, answer) - jax.nn.logsumexp(restricted, axis=-1))
