"""LoRA adapters on every linear layer of the stacked layout (the relearning attack, method.md §5.8).

For a weight W with input axes `in` and output axes `out` (heads axes flattened), the adapter is
A [L, in, r] (PEFT's uniform init) and B [L, r, out] (zeros). Training runs the side path
x·W + (x·(alpha/r)·A)·B (`side_params`; the forward adds it beside each frozen matmul, as PEFT
does), so neither the merged weight nor its gradient is ever formed; `apply_lora` is the merged
view W + (alpha / r) · A @ B reshaped to W's shape (evaluation, export). Only the adapters
receive gradients; the base params are never written.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxedit.errors import JaxeditError

# leaf -> (group, number of input axes after L)
TARGETS = {"wq": ("attn", 1), "wk": ("attn", 1), "wv": ("attn", 1), "wo": ("attn", 2),
           "w_gate": ("mlp", 1), "w_up": ("mlp", 1), "w_down": ("mlp", 1)}


def _split(shape: tuple[int, ...], n_in: int) -> tuple[int, int, int]:
    """(L, in, out) sizes of a stacked weight."""
    return shape[0], math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])


def init_lora(params: dict, rank: int, key: jax.Array, targets=tuple(TARGETS)) -> dict:
    """Adapters {name: {'a': [L,in,r], 'b': [L,r,out]}} for the target leaves present in params, in each
    leaf's dtype."""
    if rank <= 0:
        raise JaxeditError(f"LoRA rank must be positive, got {rank}")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise JaxeditError(f"unknown LoRA target(s) {sorted(unknown)}: use some of {', '.join(TARGETS)}")
    adapters = {}
    for name in targets:
        group, n_in = TARGETS[name]
        if name not in params["layers"][group]:
            continue
        key, sub = jax.random.split(key)
        weight = params["layers"][group][name]
        layers, fan_in, fan_out = _split(weight.shape, n_in)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5), as PEFT
        adapters[name] = {"a": jax.random.uniform(sub, (layers, fan_in, rank), weight.dtype, -bound, bound),
                          "b": jnp.zeros((layers, rank, fan_out), weight.dtype)}
    return adapters


def apply_lora(params: dict, adapters: dict, alpha: float, rank: int) -> dict:
    """Params with W + (alpha/rank)·A@B on each adapted leaf; every other leaf is the same array."""
    scale = alpha / rank
    layers = dict(params["layers"])
    for group in {TARGETS[name][0] for name in adapters}:
        layers[group] = dict(layers[group])
    for name, ab in adapters.items():
        group, _ = TARGETS[name]
        w = layers[group][name]
        delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]) * scale
        layers[group][name] = w + delta.reshape(w.shape).astype(w.dtype)
    return dict(params, layers=layers)


def side_params(params: dict, adapters: dict, alpha: float, rank: int) -> dict:
    """Params whose layer groups carry the adapters as `lora` {name: {'a': [L,in,r] · alpha/rank, 'b': [L,r,out]}},
    read by the forward's side path; every base leaf is the same array."""
    scale = alpha / rank
    layers = dict(params["layers"])
    for name, ab in adapters.items():
        group, _ = TARGETS[name]
        layers[group] = dict(layers[group])
        layers[group]["lora"] = dict(layers[group].get("lora", {}), **{name: {"a": ab["a"] * scale, "b": ab["b"]}})
    return dict(params, layers=layers)
