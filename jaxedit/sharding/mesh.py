"""The device mesh ('data', 'fsdp', 'tensor') and the one rules table from logical axes to mesh axes.

Every param leaf has logical axis names (`models.params.param_axes`); `DEFAULT_RULES` maps each
name to a mesh axis or None (replicated). A mesh axis that does not divide its dim is dropped for
that leaf (replicated there) and the drop is reported as a note. Batches [B,...] shard on 'data'
(replicated when B does not divide: the same values either way); `on_data` places a hot path's
batch by the mesh its params are on (data parallelism). Mesh axes are `AxisType.Auto`,
so the library's plain (sharding-unaware) jitted code runs unchanged and XLA propagates the
input shardings; `jax.make_mesh` alone would make them Explicit.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxedit.errors import JaxeditError
from jaxedit.io import logger
from jaxedit.models.config import ModelConfig
from jaxedit.models.params import param_axes, param_shapes

AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (
    ("batch", "data"), ("layers", None), ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"),
    ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("positions", None),
)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Mesh axis sizes; -1 on one axis takes all remaining devices."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def sizes(self, n_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for `n_devices` devices; JaxeditError if they do not fit."""
        sizes = (self.data, self.fsdp, self.tensor)
        text = " × ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise JaxeditError(f"mesh {text} is invalid: use positive sizes, and -1 on at most one axis")
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % fixed:
                raise JaxeditError(f"mesh {text} needs a multiple of {fixed} devices, {n_devices} are visible: "
                                   "change the fixed axes so their product divides the device count")
            sizes = tuple(n_devices // fixed if s == -1 else s for s in sizes)
        elif fixed != n_devices:
            raise JaxeditError(f"mesh {text} needs {fixed} devices, {n_devices} are visible: make the product "
                               "equal the device count (or set one axis to -1), or pass devices=")
        return sizes


def make_mesh(spec: MeshSpec, devices=None) -> Mesh:
    """A `Mesh` with axes ('data','fsdp','tensor') over `devices` (default: all, every process's)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = spec.sizes(len(devices))
    return jax.make_mesh(sizes, AXES, (AxisType.Auto,) * 3, devices=devices)


def abstract_mesh(spec: MeshSpec, n_devices: int) -> AbstractMesh:
    """A device-less mesh of `n_devices` (any number, e.g. more than exist) for shape/memory planning."""
    return AbstractMesh(spec.sizes(n_devices), AXES, (AxisType.Auto,) * 3)


def _mesh_sizes(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh | AbstractMesh, rules=DEFAULT_RULES,
                 name: str = "") -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec of one array with logical `axes` and `shape`, and notes on mesh axes dropped."""
    table, sizes = dict(rules), _mesh_sizes(mesh)
    unknown = [a for a in axes if a not in table]
    if unknown:
        raise JaxeditError(f"no sharding rule for logical axes {unknown} of {name or axes}: add them to the rules")
    spec, used, notes = [], set(), []
    for axis, dim in zip(axes, shape):
        target = table[axis]
        if target is not None and target not in sizes:
            raise JaxeditError(f"rule {axis!r} -> {target!r} names no mesh axis: use one of {', '.join(sizes)}")
        if target is None or sizes[target] == 1:
            spec.append(None)
        elif target in used:
            notes.append(f"{name}: {axis} ({dim}) not sharded, mesh axis {target!r} already used by another dim")
            spec.append(None)
        elif dim % sizes[target]:
            notes.append(f"{name}: {axis} ({dim}) not sharded over {target!r} ({sizes[target]}): it does not divide")
            spec.append(None)
        else:
            used.add(target)
            spec.append(target)
    return PartitionSpec(*spec), notes


def param_specs(cfg: ModelConfig, mesh: Mesh | AbstractMesh, rules=DEFAULT_RULES) -> tuple[dict, list[str]]:
    """(params-shaped tree of PartitionSpec, notes on every mesh axis dropped)."""
    notes: list[str] = []

    def one(path, axes, shape):
        spec, dropped = logical_spec(axes, shape, mesh, rules, jax.tree_util.keystr(path, simple=True, separator="/"))
        notes.extend(dropped)
        return spec

    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    specs = jax.tree_util.tree_map_with_path(one, param_axes(cfg), param_shapes(cfg), is_leaf=is_axes)
    return specs, notes


def param_shardings(cfg: ModelConfig, mesh: Mesh | AbstractMesh, rules=DEFAULT_RULES) -> dict:
    """Params-shaped tree of NamedSharding by the rules; dropped mesh axes are logged (DEBUG)."""
    specs, notes = param_specs(cfg, mesh, rules)
    for note in notes:
        logger.debug("sharding: %s", note)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _is_none(x) -> bool:
    return x is None


def like(tree, shardings: dict):
    """`shardings` restricted to a params-shaped tree with None holes (e.g. a `split_trainable` half)."""
    return jax.tree.map(lambda x, s: None if x is None else s, tree, shardings, is_leaf=_is_none)


def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state, shardings: dict):
    """Shardings for an optax state: param-like leaves follow `shardings`, the rest (counts) replicated.

    opt_state: the state or its `jax.eval_shape`; shardings: the trainable tree's shardings (with
    None holes where the trainable tree has them).
    """
    mesh = next(s.mesh for s in jax.tree.leaves(shardings))
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, shardings,
                                 transform_non_params=lambda _: replicated, is_leaf=_is_none)


def batch_sharding(mesh: Mesh, batch_size: int, ndim: int = 2, rules=DEFAULT_RULES, axis: int = 0) -> NamedSharding:
    """Sharding of an array of rank `ndim` whose dim `axis` is the batch B: B by the 'batch' rule ('data'),
    replicated if it does not divide."""
    spec, notes = logical_spec(("batch",), (batch_size,), mesh, rules, "batch")
    for note in notes:
        logger.debug("sharding: %s (replicated)", note)
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), *spec, *([None] * (ndim - 1 - axis))))


def shard_params(params, shardings):
    """`jax.device_put` of params (or a half with None holes) onto `shardings` (same tree)."""
    return jax.device_put(params, like(params, shardings))


def shard_batch(mesh: Mesh, tree, rules=DEFAULT_RULES, axis: int = 0):
    """Every array of `tree` placed with `batch_sharding`, dim `axis` its batch (its own B each); arrays
    without that dim (scalars) replicated."""
    def place(x):
        if np.ndim(x) <= axis:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        return jax.device_put(x, batch_sharding(mesh, np.shape(x)[axis], np.ndim(x), rules, axis))

    return jax.tree.map(place, tree)


def data_mesh(params) -> Mesh | None:
    """The mesh `params` are placed on, when its 'data' axis has more than one device; else None."""
    leaves = jax.tree.leaves(params)
    placed = getattr(leaves[0], "sharding", None) if leaves else None
    if isinstance(placed, NamedSharding) and _mesh_sizes(placed.mesh).get("data", 1) > 1:
        return placed.mesh
    return None


def on_data(params, tree, axis: int = 0):
    """Data parallelism: every array of `tree` (dim `axis` its batch) sharded over the 'data' axis of the mesh
    `params` live on, so each of its devices holds 1/data of the batch and computes that part; `tree`
    unchanged when `params` are on no such mesh (one device, or data = 1)."""
    mesh = data_mesh(params)
    return tree if mesh is None else shard_batch(mesh, tree, axis=axis)
