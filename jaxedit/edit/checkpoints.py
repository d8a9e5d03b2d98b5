"""Checkpoints of in-flight training: trainable values + optimizer state after an optimizer step.

`<dir>/step_<n>/state.npz` holds the tree's leaves (host numpy, in `jax.tree.leaves` order); the
folder is filled under a temporary name and renamed into place when complete (`io.staged`), so a
`step_<n>` folder is committed and a kill mid-save leaves the previous one intact; older steps are
removed after a save. `Writer` saves on a background thread, so training does not wait for the
disk. Values come back with the dtypes and shardings of the arrays they replace.
Each process writes only its own arrays, so every process of a multi-process run checkpoints its
own units (orbax cannot: it writes numpy leaves only from process 0 and refuses process-local
arrays there). Saves and restores are noted on the `jaxedit` logger (DEBUG and INFO).
"""

from __future__ import annotations

import os
import shutil
import threading
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


class Writer:
    """Checkpoints of one training run in `directory`, written on a background thread, one at a time.

    `save` takes a host copy of the state at once (train_step donates the arrays) and returns; the
    file is written and committed behind it while training goes on. Leaving the `with` block waits
    for the last write and re-raises its error, if any. A kill mid-write leaves the previous checkpoint.
    """

    def __init__(self, directory: str | Path):
        self.directory, self._thread, self._error = Path(directory), None, None

    def save(self, step: int, trainable, opt_state) -> None:
        """Checkpoint `(trainable, opt_state)` after optimizer step `step`."""
        self.wait()
        leaves = _host_copy(trainable, opt_state)
        self._thread = threading.Thread(target=self._run, args=(step, leaves), name="jaxedit-checkpoint")
        self._thread.start()

    def _run(self, step: int, leaves: list[np.ndarray]) -> None:
        try:
            _write(self.directory, step, leaves)
        except BaseException as err:  # re-raised on the training thread by `wait`
            self._error = err

    def wait(self) -> None:
        """Block until the pending write is committed; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Finish the pending write whatever happens meanwhile (a signal during the wait is raised after it),
        then raise the write's error if training itself went well."""
        late = None
        while self._thread is not None:
            try:
                self._thread.join()
                self._thread = None
            except BaseException as err:  # a signal while waiting: the write must not outlive the run
                late = err
        if late is not None:
            raise late
        if exc_type is None:
            self.wait()


def _host_copy(trainable, opt_state) -> list[np.ndarray]:
    """The state's leaves as host numpy arrays that own their memory (`jax.tree.leaves` order)."""
    return [np.array(x) for x in jax.tree.leaves({"trainable": trainable, "opt_state": opt_state})]


def _write(directory: Path, step: int, leaves: list[np.ndarray]) -> None:
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
