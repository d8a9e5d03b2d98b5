"""Training losses of method.md §4.2, on logits from `core.forward`.

Axes: B batch, T positions, V vocab. Per-row `weight` [B] (1 real, 0 padding rows) lets a batch
keep a constant shape; every mean is over weighted rows (or real tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxedit.models import core
from jaxedit.readout import FINAL, read

UNLEARN_THRESHOLD = -5.0


def _weighted_mean(values: jax.Array, weight: jax.Array | None) -> jax.Array:
    if weight is None:
        return values.mean()
    weight = weight.astype(values.dtype)
    return (values * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def _target_logprob(logits: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [...], logsumexp [...]) of logits [..., V] in float32, target [...] int."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return picked - lse, lse


def cross_entropy(logits: jax.Array, target: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Mean CE over the full vocabulary: logits [B,V], target [B] (injection and maintain losses)."""
    log_p, _ = _target_logprob(logits, target)
    return _weighted_mean(-log_p, weight)


def log1m_p_loss(logits: jax.Array, target: jax.Array, weight: jax.Array | None = None,
                 threshold: float = UNLEARN_THRESHOLD) -> jax.Array:
    """Pure unlearning: −mean log(1 − p(target)), rows with log p(target) < threshold contribute 0.

    The mean still counts those rows (HarmBench's `log_1_minus_p_loss`). log(1 − p) is computed
    stably as logsumexp over the other tokens minus logsumexp over all. logits [B,V], target [B].
    """
    log_p, lse = _target_logprob(logits, target)
    logits = logits.astype(lse.dtype)
    others = jnp.where(jax.nn.one_hot(target, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    log1m_p = jax.nn.logsumexp(others, axis=-1) - lse
    return _weighted_mean(jnp.where(log_p < threshold, 0.0, -log1m_p), weight)


def lm_loss(logits: jax.Array, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Next-token CE over real tokens: logits [B,T-1,V] at positions 0..T-2, tokens/mask [B,T]."""
    log_p, _ = _target_logprob(logits, tokens[:, 1:])
    real = (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(log_p.dtype)
    return -(log_p * real).sum() / jnp.maximum(real.sum(), 1.0)


def kl_loss(reference_logits: jax.Array, logits: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """KL(reference || edited) per position, averaged over real positions: logits [B,P,V], mask [B,P]."""
    f32 = jnp.promote_types(logits.dtype, jnp.float32)
    ref = jax.nn.log_softmax(reference_logits.astype(f32), axis=-1)
    new = jax.nn.log_softmax(logits.astype(f32), axis=-1)
    kl = (jnp.exp(ref) * (ref - new)).sum(-1)
    if attention_mask is None:
        return kl.mean()
    real = attention_mask.astype(f32)
    return (kl * real).sum() / jnp.maximum(real.sum(), 1.0)


def last_residuals(params: dict, cfg, tokens: jax.Array, attention_mask: jax.Array, remat: bool = False,
                   frozen_below: int = 0, prefix: jax.Array | None = None) -> jax.Array:
    """The final residual [B,D] at each prompt's last real position (`readout.read`); `core.unembed` of it
    gives `last_logits`.

    frozen_below: no backward below that layer (`core.run_layers`). prefix [S]: ids every prompt starts
    with, left out of tokens (`core.forward_shared_prefix`)."""
    return read(params, cfg, tokens, attention_mask, (FINAL,), remat=remat,
                frozen_below=frozen_below, prefix=prefix)[FINAL][:, 0]


def last_logits(params: dict, cfg, tokens: jax.Array, attention_mask: jax.Array, remat: bool = False,
                frozen_below: int = 0, prefix: jax.Array | None = None) -> jax.Array:
    """Logits [B,V] after each prompt, unembedding only the last real position; arguments as in `last_residuals`."""
    return core.unembed(cfg, params, last_residuals(params, cfg, tokens, attention_mask, remat, frozen_below, prefix))


def next_token_residuals(params: dict, cfg, tokens: jax.Array, attention_mask: jax.Array,
                         remat: bool = False, frozen_below: int = 0) -> jax.Array:
    """The final residual [B,T-1,D] at positions 0..T-2 (the ones with a next token); frozen_below as in
    `last_residuals`."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t - 1)[None], (b, t - 1))
    final, _ = core.forward(params, tokens, cfg, attention_mask=attention_mask, logit_positions=positions,
                            remat=remat, frozen_below=frozen_below, unembedded=False)
    return final


def next_token_logits(params: dict, cfg, tokens: jax.Array, attention_mask: jax.Array,
                      remat: bool = False, frozen_below: int = 0) -> jax.Array:
    """Logits [B,T-1,V] at positions 0..T-2; arguments as in `next_token_residuals`."""
    return core.unembed(cfg, params, next_token_residuals(params, cfg, tokens, attention_mask, remat, frozen_below))
