"""The params pytree: leaf shapes with logical axis names, declared and initialised by Flax.

Layout (per-layer leaves carry a leading `layers` axis; heads are an explicit axis):

    embed/tokens [V,D]            embed/positions [P,D] (GPT-2)
    layers/attn_norm/{scale,bias} [L,D]                (not OLMo-2)
    layers/attn/wq [L,D,H,E]  wk, wv [L,D,K,E]  wo [L,H,E,D]
    layers/attn/bq [L,H,E]  bk, bv [L,K,E]             (qkv_bias: GPT-2, GPT-NeoX, Qwen2, attention_bias)
    layers/attn/bo [L,D]                               (out_bias)
    layers/attn/q_norm [L,E], k_norm [L,E]             (per-head q/k norm: Gemma-3, Qwen3)
    layers/attn/q_norm [L,H,E], k_norm [L,K,E]         (whole q/k norm: OLMo-2)
    layers/attn_post_norm/scale, layers/mlp_post_norm/scale [L,D]   (Gemma-2/3, OLMo-2)
    layers/mlp_norm/{scale,bias} [L,D]                 (not OLMo-2)
    layers/mlp/w_gate, w_up [L,D,F]  w_down [L,F,D]  b_gate, b_up [L,F]  b_down [L,D]
    final_norm/{scale,bias} [D]   unembed/w [D,V] (untied models only)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxedit.models.config import ModelConfig

LAYERS, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, POSITIONS = (
    "layers", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "positions",
)


def param_axes(cfg: ModelConfig) -> dict:
    """Nested dict of leaf -> logical axis names (the shape follows from `axis_sizes`)."""
    norm = {"scale": (EMBED,)} | ({"bias": (EMBED,)} if cfg.norm == "layernorm" else {})
    layer_norm = {k: (LAYERS,) + v for k, v in norm.items()}
    attn = {
        "wq": (LAYERS, EMBED, HEADS, HEAD_DIM),
        "wk": (LAYERS, EMBED, KV_HEADS, HEAD_DIM),
        "wv": (LAYERS, EMBED, KV_HEADS, HEAD_DIM),
        "wo": (LAYERS, HEADS, HEAD_DIM, EMBED),
    }
    if cfg.qkv_bias:
        attn |= {"bq": (LAYERS, HEADS, HEAD_DIM), "bk": (LAYERS, KV_HEADS, HEAD_DIM), "bv": (LAYERS, KV_HEADS, HEAD_DIM)}
    if cfg.out_bias:
        attn["bo"] = (LAYERS, EMBED)
    if cfg.qk_norm == "per_head":
        attn |= {"q_norm": (LAYERS, HEAD_DIM), "k_norm": (LAYERS, HEAD_DIM)}
    if cfg.qk_norm == "whole":
        attn |= {"q_norm": (LAYERS, HEADS, HEAD_DIM), "k_norm": (LAYERS, KV_HEADS, HEAD_DIM)}
    mlp = {"w_up": (LAYERS, EMBED, MLP), "w_down": (LAYERS, MLP, EMBED)}
    if cfg.gated_mlp:
        mlp["w_gate"] = (LAYERS, EMBED, MLP)
    if cfg.mlp_bias:
        mlp |= {"b_up": (LAYERS, MLP), "b_down": (LAYERS, EMBED)}
        if cfg.gated_mlp:
            mlp["b_gate"] = (LAYERS, MLP)
    layers = {"attn_norm": layer_norm, "attn": attn, "mlp_norm": layer_norm, "mlp": mlp}  # declaration order seeds init
    if not cfg.pre_norms:
        del layers["attn_norm"], layers["mlp_norm"]
    if cfg.post_norms:
        layers |= {"attn_post_norm": layer_norm, "mlp_post_norm": layer_norm}
    tree = {"embed": {"tokens": (VOCAB, EMBED)}, "layers": layers, "final_norm": norm}
    if cfg.learned_positions:
        tree["embed"]["positions"] = (POSITIONS, EMBED)
    if not cfg.tie_embeddings:
        tree["unembed"] = {"w": (EMBED, VOCAB)}
    return tree


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    return {
        LAYERS: cfg.n_layers, EMBED: cfg.d_model, HEADS: cfg.n_heads, KV_HEADS: cfg.n_kv_heads,
        HEAD_DIM: cfg.head_dim, MLP: cfg.d_mlp, VOCAB: cfg.vocab_size, POSITIONS: cfg.max_positions,
    }


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of leaf -> shape tuple."""
    sizes = axis_sizes(cfg)
    return jax.tree.map(lambda axes: tuple(sizes[a] for a in axes), param_axes(cfg), is_leaf=_is_axes)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def _initializer(path: tuple[str, ...], cfg: ModelConfig):
    """Norm scales start at the identity (0 under Gemma's 1+w), biases at 0, matrices N(0, 0.02)."""
    name = path[-1]
    if name == "scale" or name.endswith("_norm"):
        return nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
    if name == "bias" or name.startswith("b"):
        return nn.initializers.zeros
    return nn.initializers.normal(0.02)


class DecoderParams(nn.Module):
    """Declares every leaf of the params tree with its logical axes (for init and sharding)."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        sizes = axis_sizes(self.cfg)

        def declare(path, axes):
            init = nn.with_logical_partitioning(_initializer(path, self.cfg), axes)
            shape = tuple(sizes[a] for a in axes)
            return self.param("/".join(path), init, shape, self.dtype)

        flat = _flatten(param_axes(self.cfg))
        return {path: declare(path, axes) for path, axes in flat.items()}


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[str, ...]]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, prefix + (key,))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random params (GPT-2-style init) in the jaxedit layout."""
    boxed = DecoderParams(cfg, dtype).init(key)["params"]
    flat = {tuple(name.split("/")): leaf for name, leaf in nn.unbox(boxed).items()}
    return _unflatten(flat)
