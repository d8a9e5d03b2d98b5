"""Checkpoints of in-flight training: trainable values + optimizer state after an optimizer step.

`<dir>/step_<n>/state.npz` holds the tree's leaves (host numpy, in `jax.tree.leaves` order); the
folder is filled under a temporary name and renamed into place when complete (`io.staged`), so a
`step_<n>` folder is committed and a kill mid-save leaves the previous one intact; older steps are
removed after a save. Values come back with the dtypes and shardings of the arrays they replace.
Each process writes only its own arrays, so every process of a multi-process run checkpoints its
own units (orbax cannot: it writes numpy leaves only from process 0 and refuses process-local
arrays there). Saves and restores are noted on the `jaxedit` logger (DEBUG and INFO).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.io import logger, say, staged

STATE = "state.npz"


def _steps(directory: Path) -> list[int]:
    """The committed steps in `directory` (temporary folders are hidden, `.step_<n>.*`)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name.removeprefix("step_")) for p in directory.glob("step_*")
                  if p.name.removeprefix("step_").isdigit() and (p / STATE).is_file())


def save(directory: str | Path, step: int, trainable, opt_state) -> None:
    """Checkpoint `(trainable, opt_state)` after optimizer step `step`."""
    directory = Path(directory)
    leaves = jax.tree.leaves(jax.device_get({"trainable": trainable, "opt_state": opt_state}))
    with staged(directory / f"step_{step}", directory=True, keep_existing=True) as tmp:
        with (tmp / STATE).open("wb") as f:
            np.savez(f, *leaves)
            f.flush()
            os.fsync(f.fileno())
    for old in _steps(directory):
        if old != step:
            shutil.rmtree(directory / f"step_{old}", ignore_errors=True)
    logger.debug("checkpoint: saved step %d in %s", step, directory)


def restore_latest(directory: str | Path, trainable, opt_state):
    """(step, trainable, opt_state) of the newest checkpoint in `directory`, or (0, the given ones)."""
    directory = Path(directory)
    steps = _steps(directory)
    if not steps:
        return 0, trainable, opt_state
    current = {"trainable": trainable, "opt_state": opt_state}
    now, treedef = jax.tree.flatten(current)
    path = directory / f"step_{steps[-1]}" / STATE
    with np.load(path) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if [(v.shape, v.dtype.itemsize) for v in values] != [(x.shape, x.dtype.itemsize) for x in now]:
        raise JaxeditError(f"the checkpoint {path.parent} does not fit this training run (other shapes or dtypes): "
                           f"remove {directory}")
    # np.savez keeps bfloat16 as raw 2-byte values: view them as the dtype they replace
    state = jax.tree.unflatten(treedef, [jax.device_put(v.view(x.dtype), x.sharding) for v, x in zip(values, now)])
    say(f"resuming training from its checkpoint at step {steps[-1]} ({directory})")
    return steps[-1], state["trainable"], state["opt_state"]
