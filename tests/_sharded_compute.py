"""Sharded runs of the library's jitted programs for tests/_sharding_worker.py: params by the rules, prompts on 'data'.

Nothing here re-implements the model: inputs are placed with `NamedSharding`s and the plain jitted
functions propagate them (XLA inserts the collectives). Results come back to the host as numpy.
`last_logits` runs on one mesh spanning every process; `patching_sweep` splits the prompts over
processes (`process_slice`), sweeps each part on that process's own devices and gathers the
per-prompt results, so no sweep program spans hosts.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from jaxedit.errors import JaxeditError
from jaxedit.localize import activation_patching
from jaxedit.localize.corruptions import PromptPairs
from jaxedit.models.config import ModelConfig
from jaxedit.readout import read_jit
from jaxedit.sharding.mesh import DEFAULT_RULES, MeshSpec, make_mesh, param_shardings, shard_batch, shard_params
from jaxedit.sharding.multihost import gather, gather_slices, process_slice


def last_logits(params: dict, cfg: ModelConfig, tokens, attention_mask, mesh: Mesh, rules=DEFAULT_RULES) -> np.ndarray:
    """Logits [B,V] at each prompt's last real token, with tokens/attention_mask [B,T] on 'data'.

    Every process passes the same params and prompts; the mesh may span processes.
    """
    params = shard_params(params, param_shardings(cfg, mesh, rules))
    tokens, attention_mask = shard_batch(mesh, (np.asarray(tokens, np.int32), np.asarray(attention_mask, np.int32)),
                                         rules)
    return gather(read_jit(params, cfg, tokens, attention_mask, ("logits",))["logits"])[:, 0]


def patching_sweep(params: dict, cfg: ModelConfig, clean, corrupt=None, attention_mask=None, *, spec: MeshSpec,
                   metric_args: tuple = (), rules=DEFAULT_RULES, **kwargs) -> activation_patching.PatchingResult:
    """`activation_patching.patching_sweep` with this process's prompts sharded on its own devices.

    clean/corrupt/attention_mask [B,T] (or a PromptPairs): every process passes all B prompts and
    sweeps `process_slice(B)` of them on a mesh `spec` over `jax.local_devices()`. metric_args
    must be per-prompt arrays [B,...] (they are split with the prompts). kwargs: the sweep's
    (metric, site, by_position, direction, chunk_size, prefix_reuse). The result covers all B
    prompts, in order, on every process.
    """
    if isinstance(clean, PromptPairs):
        if corrupt is not None or attention_mask is not None:
            raise JaxeditError("got PromptPairs and also corrupt/attention_mask: pass one or the other")
        clean, corrupt, attention_mask = clean.clean, clean.corrupt, clean.mask
    arrays = [np.asarray(a, np.int32) for a in (clean, corrupt, attention_mask)]
    args = [np.asarray(a) for a in metric_args]
    b = arrays[0].shape[0]
    if b < jax.process_count():
        raise JaxeditError(f"{b} prompts for {jax.process_count()} processes: give every process at least one")
    if any(a.ndim == 0 or a.shape[0] != b for a in args):
        raise JaxeditError(f"metric_args shapes {[a.shape for a in args]} must all be [B,...] with B={b} "
                           "(per-prompt), to split them with the prompts")
    rows = process_slice(b)
    part = slice(rows.start, rows.stop)
    mesh = make_mesh(spec, jax.local_devices())
    local_params = shard_params(params, param_shardings(cfg, mesh, rules))
    clean, corrupt, attention_mask = shard_batch(mesh, [a[part] for a in arrays], rules)
    local = activation_patching.patching_sweep(local_params, cfg, clean, corrupt, attention_mask,
                                               metric_args=tuple(a[part] for a in args), **kwargs)
    per_example = gather_slices(local.per_example, b, axis=-1)
    return dataclasses.replace(local, scores=per_example.mean(-1), per_example=per_example,
                               clean=gather_slices(local.clean, b), corrupt=gather_slices(local.corrupt, b))
