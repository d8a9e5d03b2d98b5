"""Orbax checkpoints of in-flight training: trainable values + optimizer state at an optimizer step.

Values are saved from host numpy and come back with the shardings of the arrays they replace.
Each save goes to `<dir>/step_<n>` (orbax writes a temporary folder and renames it when complete,
so a kill mid-save leaves the previous checkpoint intact); older steps are removed after a save.
Orbax checkpoints are global to a multi-process run, so a process that trains a unit of its own
does not use them (`jaxedit.sweep` passes no directory there: such a unit restarts if killed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax


def _steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name.removeprefix("step_")) for p in directory.glob("step_*")
                  if p.name.removeprefix("step_").isdigit())


def save(directory: str | Path, step: int, trainable, opt_state) -> None:
    """Checkpoint `(trainable, opt_state)` after optimizer step `step`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / f"step_{step}", jax.device_get({"trainable": trainable, "opt_state": opt_state}))
    for old in _steps(directory):
        if old != step:
            shutil.rmtree(directory / f"step_{old}", ignore_errors=True)


def restore_latest(directory: str | Path, trainable, opt_state):
    """(step, trainable, opt_state) of the newest checkpoint in `directory`, or (0, the given ones)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    steps = _steps(directory)
    if not steps:
        return 0, trainable, opt_state
    current = {"trainable": trainable, "opt_state": opt_state}
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(directory / f"step_{steps[-1]}", jax.device_get(current))
    state = jax.tree.map(lambda saved, now: jax.device_put(saved, now.sharding), state, current)
    return steps[-1], state["trainable"], state["opt_state"]
