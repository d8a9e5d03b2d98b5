"""Multi-process runs: start `jax.distributed` from the environment, split work, gather results.

Every process runs the same program. `process_slice` gives each a contiguous, balanced part of N
units (prompts, sites); `gather_slices` concatenates the parts back in process order on every
process; `gather` brings (possibly cross-process) arrays to host numpy; `process_path` names a
per-process output file so processes never write the same file. On CPU, cross-process
collectives use gloo (jax's default `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxedit.errors import JaxeditError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_CLUSTERS = {"SLURM_NTASKS": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"),
             "OMPI_COMM_WORLD_SIZE": ("OMPI_MCA_orte_hnp_uri",)}


def initialize_distributed() -> bool:
    """`jax.distributed.initialize` when a multi-process launch is visible in the environment; else a no-op.

    Reads JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID,
    or leaves them to jax's own detection under Slurm / Open MPI with more than one task. Call it
    before any other JAX call. Returns whether this process is now part of a multi-process run.
    """
    if jax.distributed.is_initialized():
        return True
    env = {k: os.environ.get(k) for k in ENV}
    if env["JAX_COORDINATOR_ADDRESS"]:
        missing = [k for k in ENV[1:] if not env[k]]
        if missing:
            raise JaxeditError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not: set all of "
                               f"{', '.join(ENV)} on every process")
        try:
            kwargs = dict(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        except ValueError:
            raise JaxeditError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                               f"{env['JAX_PROCESS_ID']!r} must be integers") from None
        _initialize(env["JAX_COORDINATOR_ADDRESS"], **kwargs)
        return True
    for count, others in _CLUSTERS.items():
        if all(k in os.environ for k in others) and int(os.environ.get(count, "1")) > 1:
            _initialize(None)
            return True
    return False


def _initialize(address, **kwargs) -> None:
    try:
        jax.distributed.initialize(address, **kwargs)
    except RuntimeError as err:
        raise JaxeditError(f"jax.distributed could not start ({str(err).splitlines()[0]}): call "
                           "initialize_distributed() first thing, before any JAX computation") from None


def process_slice(n_units: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """The contiguous units of [0, n_units) this process owns; sizes differ by at most one, in process order."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    base, extra = divmod(n_units, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def gather(tree):
    """Host numpy copies of a tree of arrays; arrays spread over several processes are gathered whole."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def gather_slices(local, n_units: int, axis: int = 0) -> np.ndarray:
    """Concatenate every process's `process_slice(n_units)` part of an array along `axis`, in process order.

    local: this process's part, `len(process_slice(n_units))` long on `axis` (other axes equal on
    all processes). Parts are padded to one length for the collective and trimmed after.
    """
    local = np.moveaxis(np.asarray(local), axis, 0)
    count = jax.process_count()
    sizes = [len(process_slice(n_units, i, count)) for i in range(count)]
    if local.shape[0] != sizes[jax.process_index()]:
        raise JaxeditError(f"this process holds {local.shape[0]} units on axis {axis}, its process_slice has "
                           f"{sizes[jax.process_index()]}: pass exactly its part")
    if count == 1:
        return np.moveaxis(local, 0, axis)
    padded = np.zeros((max(sizes),) + local.shape[1:], local.dtype)
    padded[: local.shape[0]] = local
    parts = np.asarray(multihost_utils.process_allgather(padded, tiled=False))  # [P, max, ...]
    return np.moveaxis(np.concatenate([p[:n] for p, n in zip(parts, sizes)]), 0, axis)


def process_path(path: str | os.PathLike, process_index: int | None = None,
                 process_count: int | None = None) -> Path:
    """`path` for a single process; `stem.process{i}-of-{n}.suffix` when there are n > 1 processes."""
    path = Path(path)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count == 1:
        return path
    return path.with_name(f"{path.stem}.process{index:03d}-of-{count:03d}{path.suffix}")
