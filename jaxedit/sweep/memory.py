"""Bytes per device of params, gradients and optimizer state under a mesh, from shapes alone.

`jax.eval_shape` of `init_params` and of the optimizer's `init` gives every leaf's shape and dtype
(no weights are allocated); each leaf's per-device share is its `NamedSharding.shard_shape`. The
mesh may be a real `Mesh` or an `AbstractMesh` of any size. Gradients and optimizer state exist
only for trainable leaves, as `edit.train` splits them (`edit.train.split_for_training`: a leaf with any
True mask entry is kept, whole, or as the rows of the few layers it trains, `components.trained_rows`).
Activations are not counted.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh

from jaxedit.edit.optim import AdamWSpec
from jaxedit.edit.train import split_for_training
from jaxedit.errors import JaxeditError
from jaxedit.localize.components import count_trainable
from jaxedit.models.config import ModelConfig
from jaxedit.models.params import init_params
from jaxedit.sharding.mesh import DEFAULT_RULES, like, opt_state_shardings, param_shardings, param_specs

OPTIMIZERS = ("adamw", None)
GiB = 2**30


def _bytes(tree, shardings) -> tuple[int, int]:
    """(global bytes, bytes on one device) of a tree of ShapeDtypeStructs placed by `shardings`."""
    pairs = list(zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x, _ in pairs)
    share = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in pairs)
    return total, share


def memory_report(cfg: ModelConfig, mesh: Mesh | AbstractMesh, *, dtype="bfloat16", trainable_mask=None,
                  optimizer: str | None = "adamw", accumulate: int = 1, rules=DEFAULT_RULES) -> dict:
    """Global and per-device bytes of params, grads, optimizer state and their total, and a printable table.

    trainable_mask: a broadcasting bool mask tree (`Localization.mask`); None = full fine-tune.
    optimizer: 'adamw' (jaxedit's `AdamWSpec`, `accumulate` > 1 adds its gradient accumulator)
    or None (inference: params only, no grads). Returns {'mesh', 'n_devices', 'dtype', 'optimizer', 'n_params',
    'n_trainable', 'params', 'grads', 'opt_state', 'total' (each {'global', 'per_device'} bytes),
    'notes' (mesh axes dropped by the rules), 'table'}.
    """
    if optimizer not in OPTIMIZERS:
        raise JaxeditError(f"unknown optimizer {optimizer!r}: memory_report knows 'adamw' or None")
    dtype = jnp.dtype(dtype)
    abstract = jax.eval_shape(functools.partial(init_params, cfg, dtype=dtype), jax.random.key(0))
    shardings = param_shardings(cfg, mesh, rules)
    notes = param_specs(cfg, mesh, rules)[1]
    if trainable_mask is None:
        trainable_mask = jax.tree.map(lambda x: np.ones((1,) * x.ndim, bool), abstract)
    trainable = jax.eval_shape(lambda p: split_for_training(p, trainable_mask, cfg.n_layers)[0], abstract)
    rows = {"params": _bytes(abstract, shardings), "grads": (0, 0), "opt_state": (0, 0)}
    if optimizer == "adamw":
        rows["grads"] = _bytes(trainable, like(trainable, shardings))
        opt = AdamWSpec(accumulate=accumulate)(None, 1e-5)  # the state's structure does not depend on the mask
        state = jax.eval_shape(opt.init, trainable)
        rows["opt_state"] = _bytes(state, opt_state_shardings(opt, state, like(trainable, shardings)))
    rows["total"] = tuple(sum(r[i] for r in rows.values()) for i in (0, 1))
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    report = {
        "mesh": sizes, "n_devices": math.prod(mesh.axis_sizes), "dtype": dtype.name, "optimizer": optimizer,
        "n_params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)),
        "n_trainable": count_trainable(trainable_mask, abstract),
        **{name: {"global": g, "per_device": d} for name, (g, d) in rows.items()},
        "notes": notes,
    }
    report["table"] = format_report(report)
    return report


def format_report(report: dict) -> str:
    """A small text table of a `memory_report`."""
    mesh = " × ".join(f"{k}={v}" for k, v in report["mesh"].items())
    head = (f"mesh {mesh} ({report['n_devices']} devices), {report['dtype']}, optimizer {report['optimizer']}, "
            f"{report['n_params'] / 1e9:.3f}B params, {report['n_trainable'] / 1e9:.3f}B trainable")
    lines = [head, f"{'':10s} {'global GiB':>11s} {'per device GiB':>15s}"]
    for name in ("params", "grads", "opt_state", "total"):
        lines.append(f"{name:10s} {report[name]['global'] / GiB:11.2f} {report[name]['per_device'] / GiB:15.2f}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
