"""How a sweep uses devices and processes (`jax.sharding`, `jax.distributed`; no process pool).

- Processes: each owns a contiguous share of the units (`sharding.process_slice`), runs them on its
  own devices and writes its own unit files (disjoint names, so never a collision); process 0 waits
  at a barrier and then writes the combined results and the report.
- Devices of a process: one mesh ('data', 'fsdp', 'tensor') from the config's `mesh` section;
  parameters are placed by the logical-axis rules (replicated on 'data', split on 'fsdp'/'tensor')
  and the library's jitted programs run on the whole mesh (XLA propagates the shardings).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.experimental import multihost_utils

from jaxedit import sharding
from jaxedit.errors import JaxeditError


def initialize() -> bool:
    return sharding.initialize_distributed()


def process_units(units: list) -> list:
    """This process's share of `units` (all of them in a single-process run)."""
    return [units[i] for i in sharding.process_slice(len(units))]


def check_mesh(mesh_config):
    """The mesh of the config on this process's devices (a one-line error when it does not fit)."""
    sizes = (mesh_config.data, mesh_config.fsdp, mesh_config.tensor)
    devices = jax.local_devices()
    if -1 not in sizes and 0 < math.prod(sizes) < len(devices):
        devices = devices[:math.prod(sizes)]  # a smaller mesh than the machine: use its first devices
    return sharding.make_mesh(sharding.MeshSpec(*sizes), devices)


def place_model(model, mesh_config):
    """`model` with params placed on a mesh of this process's devices (unchanged for a 1×1×1 mesh)."""
    if (mesh_config.data, mesh_config.fsdp, mesh_config.tensor) == (1, 1, 1):
        return model
    mesh = check_mesh(mesh_config)
    params = sharding.shard_params(model.params, sharding.param_shardings(model.cfg, mesh))
    return dataclasses.replace(model, params=params)


def barrier(name: str) -> None:
    """Wait for every process (no-op with one)."""
    if jax.process_count() > 1:
        try:
            multihost_utils.sync_global_devices(name)
        except RuntimeError as err:
            raise JaxeditError(f"a process of the sweep did not reach {name!r} ({err}): "
                               "rerun the sweep on every process; finished units are kept") from None
