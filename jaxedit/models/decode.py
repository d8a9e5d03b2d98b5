"""Autoregressive generation with a key/value cache: one compiled loop over a fixed [B,T] buffer.

Axes: B batch, T positions (the buffer), P prefix, D d_model, L layers, H query heads, K kv heads
(H = K*G), E head_dim, V vocab. Every row shares the prefix length, so all rows decode position
t together; the layer math is `core.block`'s with attention reading the cached keys and values
(checked against full forwards in the tests).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxedit.models import core
from jaxedit.models.config import ModelConfig


def _attend(cfg: ModelConfig, p: dict, x, cache_k, cache_v, t, inv_freq, is_local):
    """Attention of normalized x [B,1,D] at position t over cache [B,T,K,E] (updated with t's key/value)."""
    positions = jnp.full(x.shape[:2], t, jnp.int32)
    q, k, v = core._qkv(cfg, p, x, positions, inv_freq, core.Sites({}, ()))
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), t, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), t, axis=1)
    b, _, n_kv, e = k.shape
    q = q.reshape(b, 1, n_kv, cfg.n_heads // n_kv, e)
    scores = jnp.einsum("btkge,bske->bkgts", q, cache_k) * jnp.asarray(cfg.query_scale, q.dtype)
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    key = jnp.arange(cache_k.shape[1])
    window = cfg.sliding_window or cache_k.shape[1] + 1
    allowed = (key <= t) & (~is_local | (key > t - window))
    f32 = core._wide(scores.dtype)
    scores = jnp.where(allowed, scores.astype(f32), jnp.finfo(f32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    z = jnp.einsum("bkgts,bske->btkge", weights, cache_v).reshape(b, 1, cfg.n_heads, e)
    return z, cache_k, cache_v


def _layer(cfg: ModelConfig, x, scanned, t):
    """`core.block` for one new position: residual x [B,1,D], this layer's weights and cache."""
    lp, inv_freq, is_local, cache_k, cache_v = scanned
    h = core._norm(cfg, lp["attn_norm"], x)
    z, cache_k, cache_v = _attend(cfg, lp["attn"], h, cache_k, cache_v, t, inv_freq, is_local)
    attn_out = jnp.einsum("bthe,hed->btd", z, lp["attn"]["wo"])
    if cfg.attn_bias:
        attn_out = attn_out + lp["attn"]["bo"]
    if cfg.post_norms:
        attn_out = core._norm(cfg, lp["attn_post_norm"], attn_out)
    x = x + attn_out
    mlp_out = core._mlp(cfg, lp["mlp"], core._norm(cfg, lp["mlp_norm"], x), lambda name, act: act)
    if cfg.post_norms:
        mlp_out = core._norm(cfg, lp["mlp_post_norm"], mlp_out)
    return x + mlp_out, (cache_k, cache_v)


def decode_step(cfg: ModelConfig, params: dict, token, t, cache):
    """Logits [B,V] after token [B] at position t; cache (keys, values) [L,B,T,K,E] -> updated cache."""
    positions = jnp.full((token.shape[0], 1), t, jnp.int32)
    x = core.embed(cfg, params, token[:, None], core.Context(positions, None, None))
    consts = core.layer_constants(cfg)
    x, cache = jax.lax.scan(partial(_layer, cfg, t=t), x,
                            (params["layers"], consts.inv_freq, consts.is_local, *cache))
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
