"""Metrics on last-position logits [B,V] (pure, jittable). B batch, V vocab, C candidates, D d_model.

A metric that reads only a few token columns says which through `metric.columns(*args)` -> (ids
[B,N], args re-indexed into those N columns), or None when it needs the whole vocabulary; then
`on_residual` unembeds only those columns, which for a 262k vocabulary is most of a patched run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxedit.models import core


def gather(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """logits [B,V] at ids [B] -> [B], or at ids [B,C] -> [B,C]."""
    if ids.ndim == 1:
        return jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
    return jnp.take_along_axis(logits, ids, axis=-1)


def logit_diff(logits: jax.Array, answer: jax.Array, others: jax.Array) -> jax.Array:
    """[B]: logit of the answer [B] minus the mean logit of `others` ([B,C] candidates, or [B] one counterfactual)."""
    other = gather(logits, others)
    return gather(logits, answer) - (other.mean(-1) if other.ndim == 2 else other)


def _read_columns(answer: jax.Array, others: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """ids [B,1+C] = answer then others ([B] or [B,C]), and (answer, others) as indices into them."""
    rest = others.reshape(others.shape[0], -1)
    ids = jnp.concatenate([answer[:, None], rest], axis=1)
    indices = jnp.broadcast_to(jnp.arange(1, ids.shape[1]), rest.shape).reshape(others.shape)
    return ids, (jnp.zeros_like(answer), indices)


logit_diff.columns = _read_columns


def on_residual(cfg, params: dict, metric, x: jax.Array, *args) -> jax.Array:
    """metric [B] of the logits of final residual x [B,D], unembedding only the columns it reads (if it says)."""
    picked = metric.columns(*args) if hasattr(metric, "columns") else None
    if picked is None:
        return metric(core.unembed(cfg, params, x), *args)
    ids, column_args = picked
    return metric(core.unembed_columns(cfg, params, x, ids), *column_args)


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


answer_prob.columns = lambda answer, candidates=None: None if candidates is None else _read_columns(answer, candidates)
