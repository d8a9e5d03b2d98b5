"""Sharding: one mesh ('data', 'fsdp', 'tensor'), one rules table, multi-process helpers."""

from jaxedit.sharding.mesh import (AXES, DEFAULT_RULES, MeshSpec, abstract_mesh, batch_sharding, data_mesh, like,
                                   logical_spec, make_mesh, on_data, opt_state_shardings, param_shardings, param_specs,
                                   shard_batch, shard_params)
from jaxedit.sharding.multihost import gather, gather_slices, initialize_distributed, process_path, process_slice

__all__ = [
    "AXES", "DEFAULT_RULES", "MeshSpec", "abstract_mesh", "batch_sharding", "data_mesh", "like", "logical_spec",
    "make_mesh", "on_data", "opt_state_shardings", "param_shardings", "param_specs", "shard_batch", "shard_params",
    "gather", "gather_slices", "initialize_distributed", "process_path", "process_slice",
]
