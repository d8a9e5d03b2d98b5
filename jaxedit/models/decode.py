"""Autoregressive generation with a key/value cache: one compiled loop over a fixed [B,T] buffer.

Axes: B batch, T positions (the buffer), P prefix, D d_model, L layers, H query heads, K kv heads
(H = K*G), E head_dim, V vocab. Every row shares the prefix length, so all rows decode position
t together; each layer is `core.block` with attention over the cached keys and values
(checked against full forwards in the tests).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxedit.models import core
from jaxedit.models.config import ModelConfig


def _step_context(cfg: ModelConfig, batch: int, length: int, t) -> core.Context:
    """Context of one query at position t over a cache of `length` slots (masks [B,1,length])."""
    key = jnp.arange(length)[None, None]
    allowed = jnp.broadcast_to(key <= t, (batch, 1, length))
    window = cfg.sliding_window or length + 1
    return core.Context(jnp.full((batch, 1), t, jnp.int32), allowed, allowed & (key > t - window))


def _layer(cfg: ModelConfig, ctx: core.Context, t, x, scanned):
    """`core.block` for the new position t: residual x [B,1,D], this layer's weights and cache [B,T,K,E]."""
    lp, inv_freq, is_local, cache_k, cache_v = scanned
    new = core.keys_values(cfg, lp, x, ctx.positions, inv_freq)
    cache = core.KeysValues(jax.lax.dynamic_update_slice_in_dim(cache_k, new.k.astype(cache_k.dtype), t, axis=1),
                            jax.lax.dynamic_update_slice_in_dim(cache_v, new.v.astype(cache_v.dtype), t, axis=1))
    x = core.block(cfg, lp, x, ctx, inv_freq, is_local, core.Sites({}, ()), prefix=cache, at=t)
    return x, tuple(cache)


def decode_step(cfg: ModelConfig, params: dict, token, t, cache):
    """Logits [B,V] after token [B] at position t; cache (keys, values) [L,B,T,K,E] -> updated cache."""
    ctx = _step_context(cfg, token.shape[0], cache[0].shape[2], t)
    x = core.embed(cfg, params, token[:, None], ctx)
    consts = core.layer_constants(cfg)
    scanned = (params["layers"], consts.inv_freq, consts.is_local, *cache)
    x, cache = jax.lax.scan(partial(_layer, cfg, ctx, t), x, scanned)
    return core.unembed(cfg, params, x[:, 0]), cache


def sample_inverse_cdf(logits, uniform):
    """Token [B] drawn from softmax(logits [B,V]) with one uniform [B] in [0,1) per row.

    Inverse-CDF sampling: one random number per row instead of `random.categorical`'s V Gumbel
    draws (those dominated a decode step for a 262k vocabulary on CPU).
    """
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    index = (cdf <= uniform[:, None] * cdf[:, -1:]).sum(-1)  # first token whose cdf passes the draw
    return jnp.minimum(index, logits.shape[-1] - 1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "temperature"))
def generate(params: dict, tokens, n_prefix, keys, stop_ids, pad_id, cfg: ModelConfig, temperature: float):
    """Continue the first n_prefix tokens of buffer tokens [B,T]: (tokens [B,T] int32, mask [B,T] int32).

    n_prefix (traced: prompts of any length share the program) ≥ 1; keys [B]: one PRNG key per row
    (a row's sample does not depend on its batch). temperature 0 is greedy. A row ends at its first
    generated token in stop_ids [S] (kept, mask 1); later positions are masked (mask 0, token pad_id).
    """
    b, length = tokens.shape
    dtype = params["embed"]["tokens"].dtype
    shape = (cfg.n_layers, b, length, cfg.n_kv_heads, cfg.head_dim)
    cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    tokens = tokens.astype(jnp.int32)

    def body(t, state):
        tokens, cache = state
        logits, cache = decode_step(cfg, params, tokens[:, t], t, cache)
        logits = logits.astype(jnp.float32)
        if temperature == 0:
            sampled = logits.argmax(-1)
        else:
            uniform = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, t)))(keys)
            sampled = sample_inverse_cdf(logits / temperature, uniform)
        given = jax.lax.dynamic_index_in_dim(tokens, t + 1, 1, keepdims=False)
        chosen = jnp.where(t + 1 < n_prefix, given, sampled.astype(jnp.int32))
        return jax.lax.dynamic_update_index_in_dim(tokens, chosen, t + 1, axis=1), cache

    tokens, _ = jax.lax.fori_loop(0, length - 1, body, (tokens, cache))
    generated = jnp.arange(length)[None] >= n_prefix
    stops = jnp.isin(tokens, stop_ids) & generated
    stopped_before = jnp.cumsum(stops, axis=1) - stops
    mask = (stopped_before == 0).astype(jnp.int32)
    return jnp.where(mask == 1, tokens, pad_id), mask
