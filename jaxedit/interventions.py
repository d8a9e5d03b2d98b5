"""Interventions as data: which sites exist, and `SiteEdit(mask, value, delta)` applied to them.

An edited activation is `where(mask, value, act) + delta`. Which sites are edited is Python
structure (the keys of the `edits` dict); where and how much is array content, so one compiled
program serves every patch of a sweep, `vmap` over edits and `grad` with respect to `delta`.

Site shapes (B batch, T positions, D d_model, H query heads, K kv heads, E head_dim, F d_mlp,
L layers). Per-layer sites carry a leading L axis in `edits` and in captures; `embed` does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxedit.errors import JaxeditError

EMBED_SITE = "embed"
LAYER_SITES = (
    "resid_pre",  # [B,T,D] residual stream entering the layer
    "attn_in",  # [B,T,D] normalized input of attention
    "attn_q",  # [B,T,H,E] query projection (+bias), before q-norm and RoPE
    "attn_k",  # [B,T,K,E] key projection (+bias), before k-norm and RoPE
    "attn_v",  # [B,T,K,E] value projection (+bias)
    "attn_z",  # [B,T,H,E] per-head attention output, before the output projection
    "attn_out",  # [B,T,D] what attention adds to the residual (after Gemma-2/3's post-norm)
    "resid_mid",  # [B,T,D] residual stream between attention and MLP
    "mlp_in",  # [B,T,D] normalized input of the MLP
    "mlp_hidden",  # [B,T,F] neuron activations, the input of the down projection
    "mlp_out",  # [B,T,D] what the MLP adds to the residual (after Gemma-2/3's post-norm)
    "resid_post",  # [B,T,D] residual stream leaving the layer
)
SITES = (EMBED_SITE,) + LAYER_SITES


@struct.dataclass
class SiteEdit:
    """Edit of one site: `act = where(mask, value, act) + delta`; each field optional.

    mask: bool, broadcastable to the activation; value: same shape as the activation (or
    broadcastable); delta: broadcastable. For per-layer sites every field has a leading L axis
    (size L or 1).
    """

    mask: jax.Array | None = None
    value: jax.Array | None = None
    delta: jax.Array | None = None


def apply_edit(act: jax.Array, edit: SiteEdit | None) -> jax.Array:
    """Apply one site's edit (per-layer slice already taken) to an activation."""
    if edit is None:
        return act
    if edit.mask is not None:
        act = jnp.where(edit.mask, jnp.asarray(edit.value, act.dtype), act)
    if edit.delta is not None:
        act = act + jnp.asarray(edit.delta, act.dtype)
    return act


def check_sites(names, what: str) -> None:
    """Raise JaxeditError if any of `names` is not a known site."""
    unknown = sorted(set(names) - set(SITES))
    if unknown:
        raise JaxeditError(f"unknown {what} site(s) {unknown}: known sites are {', '.join(SITES)}")


def validate_edits(edits: dict[str, SiteEdit] | None, n_layers: int) -> dict[str, SiteEdit]:
    """Check site names and fields; broadcast a size-1 layer axis to L for the layer scan."""
    if not edits:
        return {}
    check_sites(edits, "edit")
    out = {}
    for name, edit in edits.items():
        if edit.mask is not None and edit.value is None:
            raise JaxeditError(f"edit of {name!r} has a mask but no value: give value= (what to write where mask is True)")
        if name == EMBED_SITE:
            out[name] = edit
            continue
        out[name] = jax.tree.map(lambda a: _layer_leading(a, n_layers, name), edit)
    return out


def _layer_leading(array, n_layers: int, name: str):
    array = jnp.asarray(array)
    if array.ndim == 0 or array.shape[0] not in (1, n_layers):
        raise JaxeditError(
            f"edit of {name!r} has shape {array.shape}: per-layer edits need a leading layer axis of size {n_layers} or 1"
        )
    return jnp.broadcast_to(array, (n_layers,) + array.shape[1:])


def one_layer_edit(name: str, layer: int | jax.Array, n_layers: int, mask=None, value=None, delta=None) -> dict[str, SiteEdit]:
    """Edit of site `name` at one (possibly traced) layer index; other layers are left alone.

    mask/value/delta are shaped like (or broadcast to) the site's activation, without a layer axis.
    """
    ndim = max(jnp.ndim(a) for a in (mask, value, delta) if a is not None)
    on_layer = (jnp.arange(n_layers) == layer).reshape((n_layers,) + (1,) * ndim)
    edit = SiteEdit(
        mask=None if mask is None else on_layer & jnp.asarray(mask, bool)[None],
        value=None if value is None else jnp.asarray(value)[None],
        delta=None if delta is None else jnp.where(on_layer, jnp.asarray(delta)[None], 0),
    )
    return {name: edit}
