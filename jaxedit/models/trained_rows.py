"""Layer scans in which a stacked matrix trains at a few layers, without forming its [L,…] weight gradient.

A localization that trains k of the L layers of a stacked matrix W [L, in…, out…] needs dLoss/dW at
those k layers only. Differentiating a `lax.scan` that takes W as a scanned input forms x_lᵀ·dy_l at
every layer and writes it into a zero-filled [L,…] buffer before the k rows are gathered (on
Gemma-3-270M's default edit step that was most of the step). Here (`scan_layers`) W enters the scan
without a gradient, with its trained layers' values put in; every use y = x·W_l adds a zero "tap" to
y and records its input x; the k trained rows' gradient is formed after the backward scan from the
recorded inputs and the taps' cotangents (dy) of those layers alone: dW_r = x_rᵀ·dy_r. The taps and
inputs are activation-sized, not weight-sized. The gradients equal those of the merged computation
up to float summation order.

The model code's side of this is `core.Sites.tap`, called at every use of a matrix in `MATRICES`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

MATRICES = ("wq", "wk", "wv", "wo", "w_up", "w_gate", "w_down")  # the layer matrices `core` taps


@partial(jax.tree_util.register_dataclass, data_fields=("full", "rows", "trained"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class TrainedRows:
    """A stacked layer leaf full [L,…] whose layers rows [k] (distinct int32) hold trained [k,…] instead."""

    full: jax.Array
    rows: jax.Array
    trained: jax.Array

    def merged(self) -> jax.Array:
        """full with the trained rows put in [L,…] (differentiable in trained the usual way)."""
        return self.full.at[self.rows].set(self.trained.astype(self.full.dtype), unique_indices=True)


def _is_rows(x) -> bool:
    return isinstance(x, TrainedRows)


def split_layers(tree, at: int) -> tuple:
    """(tree [:at], tree [at:]) of a tree stacked over layers; a `TrainedRows` leaf (trained at layers >= at
    only) is plain below `at` and keeps its trained rows above."""
    below = jax.tree.map(lambda a: (a.full if _is_rows(a) else a)[:at], tree, is_leaf=_is_rows)
    above = jax.tree.map(lambda a: TrainedRows(a.full[at:], a.rows - at, a.trained) if _is_rows(a) else a[at:],
                         tree, is_leaf=_is_rows)
    return below, above


def no_taps(label: str) -> None:
    """The taps argument of a scan body that taps nothing."""
    del label


def scan_layers(body: Callable, carry, layers: dict, xs, aux, remat: bool = False):
    """(carry, ys) of `lax.scan` over the layers' leading axis: body(carry, lp, x, aux, taps) -> (carry, y, inputs).

    layers: stacked layer params; a leaf may be `TrainedRows`. xs: other scanned data [L,…]; aux: arrays
    every layer reads (the body closes over no traced value). taps(label) gives a body's `core.Sites`
    its taps ({matrix name: zero tap of y's shape, or None to only record shapes}; None: tap nothing),
    and the body returns inputs {label: site.inputs}. A `TrainedRows` leaf of a matrix in MATRICES is
    differentiated through taps (module docstring); one elsewhere (a norm, a bias) is merged.
    """
    layers = jax.tree_util.tree_map_with_path(
        lambda path, a: a.merged() if _is_rows(a) and _name(path) not in MATRICES else a, layers, is_leaf=_is_rows)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(layers, is_leaf=_is_rows)
    leaves = [a for _, a in with_paths]
    if any(_is_rows(a) for a in leaves):
        return _scan_with_taps(body, carry, with_paths, treedef, xs, aux, remat)

    def step(c, s):
        return body(c, jax.tree.unflatten(treedef, s[0]), s[1], aux, no_taps)[:2]
    return jax.lax.scan(jax.checkpoint(step) if remat else step, carry, (leaves, xs))


def _scan_with_taps(body: Callable, carry, with_paths: list, treedef, xs, aux, remat: bool):
    """`scan_layers` of flattened layers (path, leaf) of which some are `TrainedRows` of MATRICES."""
    leaves = [a for _, a in with_paths]
    tapped = [i for i, a in enumerate(leaves) if _is_rows(a)]
    others = [i for i in range(len(leaves)) if i not in tapped]
    names = [_name(with_paths[i][0]) for i in tapped]
    rows = [leaves[i].rows for i in tapped]
    n_layers = leaves[tapped[0]].full.shape[0]
    plain = [leaves[i] for i in others]
    full = [leaves[i].full for i in tapped]
    trained = [leaves[i].trained for i in tapped]

    def layer_params(plain_l, merged_l):
        out = [None] * len(leaves)
        for i, a in zip(others + tapped, plain_l + merged_l):
            out[i] = a
        return jax.tree.unflatten(treedef, out)

    def merge(full, rows, trained):
        """The tapped stacks with their trained rows put in, scanned like any layer input: a matrix picked per layer
        inside the body would be saved, stacked, for the backward scan."""
        return [TrainedRows(f, r, t).merged() for f, r, t in zip(full, rows, trained)]

    def run(carry, plain, trained, full, rows, xs, aux, taps):
        def step(c, s):
            plain_l, merged_l, x, taps_l = s
            c, y, inputs = body(c, layer_params(plain_l, merged_l), x, aux, no_taps if taps_l is None else taps_l.get)
            return c, (y, inputs)
        c, (y, inputs) = jax.lax.scan(jax.checkpoint(step) if remat else step, carry,
                                      (plain, merge(full, rows, trained), xs, taps))
        return (c, y), inputs

    def probe():  # one layer's body, traced only: the taps' shapes
        plain_l, full_l, x = jax.tree.map(lambda a: a[0], (plain, full, xs))
        return body(carry, layer_params(plain_l, full_l), x, aux, lambda label: dict.fromkeys(names))[2]

    shapes = jax.eval_shape(probe)

    @jax.custom_vjp
    def scanned(carry, plain, trained, full, rows, xs, aux):
        return run(carry, plain, trained, full, rows, xs, aux, None)[0]

    def fwd(carry, plain, trained, full, rows, xs, aux):
        on = [p.perturbed for p in plain]
        carry, plain, trained, full, rows, xs, aux = jax.tree.map(
            lambda p: p.value, (carry, plain, trained, full, rows, xs, aux))
        taps = {label: {name: jnp.zeros((n_layers, *xy[1].shape), xy[1].dtype) for name, xy in site.items()}
                for label, site in shapes.items()}

        def differentiable(taps, carry, moving):
            it = iter(moving)
            return run(carry, [next(it) if o else p for p, o in zip(plain, on)], trained, full, rows, xs, aux, taps)

        moving = [p for p, o in zip(plain, on) if o]
        out, vjp, inputs = jax.vjp(differentiable, taps, carry, moving, has_aux=True)
        return out, (vjp, inputs, on, trained, rows)

    def bwd(res, d_out):
        vjp, inputs, on, trained, rows = res
        d_taps, d_carry, d_moving = vjp(_instantiate(d_out))
        it = iter(d_moving)
        d_plain = [next(it) if o else None for o in on]
        d_trained = [sum(_row_gradient(inputs[label][name], d_taps[label][name], r)
                         for label in inputs if name in inputs[label]).astype(t.dtype)
                     for name, r, t in zip(names, rows, trained)]
        return d_carry, d_plain, d_trained, None, None, None, None

    scanned.defvjp(fwd, bwd, symbolic_zeros=True)
    return scanned(carry, plain, trained, full, rows, xs, aux)


def _name(path) -> str:
    """The last key of a tree path (a layer leaf's name, e.g. 'w_up')."""
    return str(getattr(path[-1], "key", path[-1]))


def _row_gradient(x: jax.Array, dy: jax.Array, rows: jax.Array) -> jax.Array:
    """dW [k, in…, out…] of rows [k] from inputs x [L, B, T, in…] and output cotangents dy [L, B, T, out…]."""
    x, dy = x[rows], dy[rows]
    k, b, t = x.shape[:3]
    flat = jnp.einsum("kni,kno->kio", x.reshape(k, b * t, -1), dy.reshape(k, b * t, -1).astype(x.dtype))
    return flat.reshape(k, *x.shape[3:], *dy.shape[3:])


def _instantiate(tree):
    return jax.tree.map(lambda z: jnp.zeros(z.shape, z.dtype) if isinstance(z, SymbolicZero) else z, tree,
                        is_leaf=lambda z: isinstance(z, SymbolicZero))
