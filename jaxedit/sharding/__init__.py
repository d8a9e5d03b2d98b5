"""Sharding: one mesh ('data', 'fsdp', 'tensor'), one rules table, multi-process helpers, memory planning.

`jaxedit.sharding.compute` runs the library's jitted forward and patching sweep sharded by these.
"""

from jaxedit.sharding.mesh import (AXES, DEFAULT_RULES, MeshSpec, abstract_mesh, batch_sharding, like, logical_spec,
                                   make_mesh, opt_state_shardings, param_shardings, param_specs, shard_batch,
                                   shard_params)
from jaxedit.sharding.memory import format_report, memory_report
from jaxedit.sharding.multihost import gather, gather_slices, initialize_distributed, process_path, process_slice

__all__ = [
    "AXES", "DEFAULT_RULES", "MeshSpec", "abstract_mesh", "batch_sharding", "like", "logical_spec", "make_mesh",
    "opt_state_shardings", "param_shardings", "param_specs", "shard_batch", "shard_params", "format_report",
    "memory_report", "gather", "gather_slices", "initialize_distributed", "process_path", "process_slice",
]
