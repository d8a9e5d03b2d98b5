"""Masked AdamW that leaves every parameter outside the mask bit-identical (method.md §4.3).

Masks are params-shaped pytrees of bool leaves that broadcast against their parameters (True =
may change), as built by `jaxedit.localize.components.trainable_mask`. Leaves whose mask is all
False are split off (`split_trainable`) so they get neither a gradient nor optimizer state; the
remaining, partially trainable leaves keep their broadcasting mask, applied to the gradient first
(before global-norm clipping, so frozen entries do not count in the norm) and to the update last.
A stacked layer matrix that trains in a few layers only is held by its trained rows (`LayerSlice`),
so that the optimizer's state and update cover those layers alone.
`optax.masked` is not used: it passes masked-out gradients through unchanged.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxedit.errors import JaxeditError
from jaxedit.models.trained_rows import TrainedRows


def _is_none(x) -> bool:
    return x is None


def _zip(params, mask, name: str):
    try:
        return jax.tree.map(lambda p, m: (p, m), params, mask)
    except ValueError as err:
        raise JaxeditError(f"{name} does not have the params' tree structure ({err}): "
                           "build it from this model's config") from None


def _kept(mask, keep) -> dict:
    """Per leaf, whether it goes in the trainable half: `keep` (a params-shaped bool tree) or any True entry."""
    return jax.tree.map(lambda m: bool(np.any(m)), mask) if keep is None else keep


@partial(jax.tree_util.register_dataclass, data_fields=("full", "rows"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """The frozen half's entry for a stacked layer matrix `full` [L,…] of which only `rows` [k] (distinct
    layer indices, int32 data: localizations of one k share a compiled step) train; the trainable half
    holds those rows [k,…], so the optimizer keeps state for them alone."""

    full: jax.Array
    rows: jax.Array

    def put(self, trained: jax.Array) -> jax.Array:
        """`full` with `rows` replaced by trained [k,…] (the gradient w.r.t. trained is that of those rows)."""
        return TrainedRows(self.full, self.rows, trained).merged()


def _on_devices_of(x, rows: np.ndarray) -> jax.Array:
    """rows [k] int32 as an array on the devices `x` lives on (replicated over its mesh when it has one)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return jax.device_put(rows, NamedSharding(sharding.mesh, PartitionSpec()))
    return jnp.asarray(rows, jnp.int32)


def _path(keys) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in keys)


def split_trainable(params, mask, keep=None, rows=None) -> tuple[dict, dict]:
    """(trainable, frozen): two params-shaped trees, each leaf in exactly one, None in the other.

    A leaf is trainable when any entry of its mask is True, or where `keep` says so (e.g.
    `components.trained_leaves`); it stays whole (its mask still applies), unless `rows` ({path: layer
    rows [k]}, `components.trained_rows`) names it: then the trainable half holds its rows [k,…] and the
    frozen half a `LayerSlice` of the whole leaf.
    """
    rows = rows or {}
    kept = _kept(mask, keep)
    _zip(params, _zip(mask, kept, "keep"), "mask")  # one structure, or one error line

    def trainable(path, p, k):
        r = rows.get(_path(path))
        return p[r] if r is not None else p if k else None

    def frozen(path, p, k):
        r = rows.get(_path(path))
        return LayerSlice(p, _on_devices_of(p, r)) if r is not None else None if k else p

    return (jax.tree_util.tree_map_with_path(trainable, params, kept),
            jax.tree_util.tree_map_with_path(frozen, params, kept))


def merge(trainable, frozen) -> dict:
    """The full params tree back from `split_trainable`'s halves."""
    return jax.tree.map(lambda t, f: f if t is None else f.put(t) if isinstance(f, LayerSlice) else t,
                        trainable, frozen, is_leaf=_is_none)


def loss_params(trainable, frozen) -> dict:
    """The params tree the loss differentiates: `merge`, except that a leaf held by its trained rows stays a
    `TrainedRows` (the model's layer scan differentiates it without forming the [L,…] weight gradient)."""
    return jax.tree.map(lambda t, f: f if t is None else TrainedRows(f.full, f.rows, t)
                        if isinstance(f, LayerSlice) else t, trainable, frozen, is_leaf=_is_none)


def trainable_part(mask, keep=None, rows=None) -> dict:
    """The mask restricted to trainable leaves (None elsewhere), shaped like `split_trainable`'s first half
    (a leaf `rows` names: its mask at those layers)."""
    rows = rows or {}

    def part(path, m, k):
        m, r = np.asarray(m, bool), rows.get(_path(path))
        if not k:
            return None
        return m if r is None or m.shape[0] == 1 else m[r]  # a [1,…] mask broadcasts over the k rows too

    return jax.tree_util.tree_map_with_path(part, mask, _kept(mask, keep))


def _where_mask(mask):
    """A stateless transformation zeroing every update entry where the mask is False."""

    def update(updates, state, params=None):
        del params
        out = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, mask)
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def cosine_schedule(lr: float, steps: int, warmup: int = 0) -> optax.Schedule:
    """torch `CosineAnnealingLR(T_max=steps)`: lr·(1 + cos(π t / steps)) / 2, 0 at t = steps (§4.3).

    With warmup > 0: linear 0 → lr over `warmup` steps, then the cosine over the remaining steps.
    """
    if steps <= 0 or warmup < 0 or warmup >= steps:
        raise JaxeditError(f"cosine schedule needs steps > warmup ≥ 0, got steps={steps}, warmup={warmup}")
    if warmup == 0:
        return optax.cosine_decay_schedule(lr, steps)
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps)  # lr may be traced (a jitted step's data)
    return lambda t: lr * unit(t)


def masked_adamw(mask, lr_schedule, weight_decay: float = 0.0, clip_norm: float | None = 1.0,
                 accumulate: int = 1, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 mu_dtype=None) -> optax.GradientTransformation:
    """mask grad → clip by global norm → AdamW → mask update; `accumulate` > 1 wraps it in `optax.MultiSteps`.

    mask: the trainable leaves' masks (`trainable_part(mask)`), structured like the trainable tree.
    Defaults are torch's AdamW betas/eps with weight decay 0 (§4.3). With accumulate=k the update
    is applied every k calls, on the mean of the k gradients (zero updates in between).
    """
    chain = [_where_mask(mask)]
    if clip_norm is not None:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain += [optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype),
              _where_mask(mask)]
    opt = optax.chain(*chain)
    if accumulate > 1:
        return optax.MultiSteps(opt, every_k_schedule=accumulate).gradient_transformation()
    return opt


@dataclasses.dataclass(frozen=True)
class AdamWSpec:
    """The static half of a `masked_adamw` (which transformations run); the mask and lr are its data.

    A jitted step takes the spec as a static argument and builds `spec(mask, lr)` inside, so one
    compiled step serves every localization of one trainable structure and every learning rate.
    steps: length of the cosine schedule (with `warmup`); None: a constant lr.
    """

    steps: int | None = None
    warmup: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    accumulate: int = 1

    def __call__(self, mask, lr) -> optax.GradientTransformation:
        schedule = lr if self.steps is None else cosine_schedule(lr, self.steps, self.warmup)
        return masked_adamw(mask, schedule, self.weight_decay, self.clip_norm, self.accumulate)

    def init(self, trainable):
        """The optimizer state of `trainable` (neither the mask nor lr enter it); checks the schedule."""
        return self(None, 1.0).init(trainable)


def apply_masked_updates(params, updates, mask):
    """params + updates where the mask is True; the very same bits elsewhere (even -0.0)."""
    return jax.tree.map(lambda p, u, m: jnp.where(m, (p + u).astype(p.dtype), p), params, updates, mask)
