"""Path patching for fact lookup (method.md §3.2): extraction heads and enrichment MLPs.

orig = the corrupted run, new = the clean run; metric = logit difference at the last position,
normalized per example by the batch means of the clean and corrupted runs,
(LD − mean LD_corrupt) / (mean LD_clean − mean LD_corrupt).

* Extraction heads: sender = one head's z (layer l, head h, all positions), receiver = the final
  residual at the last position, along paths that pass through no other attention head: every
  other head's z is frozen at its orig value and MLPs recompute ("direct path incl. MLPs"). With
  every head frozen no information moves between positions, so only the last position can
  reach the receiver: the suffix l..L-1 runs on that one position (a test checks this against
  full-length forwards).
* Enrichment MLPs: sender = mlp_out of layer l, receiver = resid_pre of layer r (direct path
  only): the receiver gets orig resid_pre[r] + (new − orig) mlp_out[l] at every position, then
  layers r..L-1 run normally. Senders l ≥ r have no path to the receiver and score exactly 0.

Each sweep is one jitted program: clean and corrupted activations captured once, senders
mapped with `lax.map` over layers / chunks and `vmap` within, only last-position logits
unembedded. Axes: B batch, T positions, D d_model, L layers, H heads, E head_dim.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.interventions import SiteEdit
from jaxedit.localize import metrics
from jaxedit.models import core
from jaxedit.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class PathPatchResult:
    """Path-patching scores; senders are [L,H] heads or [L] MLPs."""

    scores: np.ndarray  # [senders...] mean normalized metric over the batch
    per_example: np.ndarray  # [senders..., B] normalized metric per example
    clean: np.ndarray  # [B] logit difference of the clean run
    corrupt: np.ndarray  # [B] logit difference of the corrupted run


def _at(acts: jax.Array, last: jax.Array) -> jax.Array:
    """Captured [L,B,T,...] at positions last [B,1] -> [L,B,1,...]."""
    index = last.reshape((1,) + last.shape + (1,) * (acts.ndim - 3))
    return jnp.take_along_axis(acts, index, axis=2)


def _runs(cfg, params, clean, corrupt, mask, answer, others, capture):
    """Clean and corrupted runs as one forward: (last positions [B,1], LD clean [B], LD corrupt [B], caches)."""
    last = core.last_positions(mask)
    pair = lambda a: jnp.concatenate([a, a])  # noqa: E731
    logits, cache = core.forward(params, jnp.concatenate([clean, corrupt]), cfg, attention_mask=pair(mask),
                                 logit_positions=pair(last), capture=capture)
    b = clean.shape[0]
    ld = metrics.logit_diff(logits[:, 0], pair(answer), pair(others))
    halves = [jax.tree.map(lambda a, i=i: a[:, i * b:(i + 1) * b], cache) for i in (0, 1)]
    return last, ld[:b], ld[b:], halves[0], halves[1]


def _normalize(patched, ld_clean, ld_corrupt):
    return metrics.normalized(patched, ld_clean.mean(), ld_corrupt.mean())


@partial(jax.jit, static_argnames=("cfg", "head_chunk"))
def _extraction(params, clean, corrupt, mask, answer, others, cfg: ModelConfig, head_chunk: int | None):
    last, ld_clean, ld_corrupt, clean_cache, corrupt_cache = _runs(
        cfg, params, clean, corrupt, mask, answer, others, ("attn_z", "resid_pre"))
    z_new, z_orig = _at(clean_cache["attn_z"], last), _at(corrupt_cache["attn_z"], last)  # [L,B,1,H,E]
    x_orig = _at(corrupt_cache["resid_pre"], last)  # [L,B,1,D]
    ctx = core.make_context(cfg, jnp.ones_like(last), positions=last)
    consts = core.layer_constants(cfg)
    freeze = jnp.ones((1,) * z_orig.ndim, bool)
    frozen = {"attn_z": SiteEdit(mask=freeze, value=z_orig)}  # shared by all senders

    def sender(layer, head):
        one = lambda a: jax.lax.dynamic_slice_in_dim(a, layer, 1)  # noqa: E731
        z = jnp.where(jnp.arange(cfg.n_heads)[:, None] == head, z_new[layer], z_orig[layer])  # [B,1,H,E]
        x, _ = core.run_layers(cfg, jax.tree.map(one, params["layers"]), jax.tree.map(one, consts), x_orig[layer],
                               ctx, {"attn_z": SiteEdit(mask=freeze, value=z[None])}, ())
        x = core.run_from(cfg, params, x, ctx, layer + 1, frozen)
        return metrics.on_residual(cfg, params, metrics.logit_diff, x[:, 0], answer, others)

    def layer_senders(layer):
        return jax.lax.map(partial(sender, layer), jnp.arange(cfg.n_heads), batch_size=head_chunk or cfg.n_heads)

    patched = jax.lax.map(layer_senders, jnp.arange(cfg.n_layers))  # [L,H,B]
    return _normalize(patched, ld_clean, ld_corrupt), ld_clean, ld_corrupt


@partial(jax.jit, static_argnames=("cfg", "receiver", "chunk"))
def _enrichment(params, clean, corrupt, mask, answer, others, cfg: ModelConfig, receiver: int, chunk: int):
    last, ld_clean, ld_corrupt, clean_cache, corrupt_cache = _runs(
        cfg, params, clean, corrupt, mask, answer, others, ("mlp_out", "resid_pre"))
    delta = clean_cache["mlp_out"][:receiver] - corrupt_cache["mlp_out"][:receiver]  # [r,B,T,D]
    x_orig = corrupt_cache["resid_pre"][receiver]
    ctx = core.make_context(cfg, mask)

    def sender(d):
        x = core.run_from(cfg, params, x_orig + d, ctx, receiver, rows=last)[:, 0]
        return metrics.on_residual(cfg, params, metrics.logit_diff, x, answer, others)

    patched = jax.lax.map(sender, delta, batch_size=min(chunk, receiver))  # [r,B]
    scores = _normalize(patched, ld_clean, ld_corrupt)
    no_path = jnp.zeros((cfg.n_layers - receiver,) + scores.shape[1:], scores.dtype)
    return jnp.concatenate([scores, no_path]), ld_clean, ld_corrupt


def _result(per_example, ld_clean, ld_corrupt) -> PathPatchResult:
    per_example, ld_clean, ld_corrupt = jax.device_get((per_example, ld_clean, ld_corrupt))
    return PathPatchResult(per_example.mean(-1), per_example, ld_clean, ld_corrupt)


def extraction_head_scores(cfg: ModelConfig, params, clean, corrupt, mask, answer, others,
                           *, head_chunk: int | None = None) -> PathPatchResult:
    """Path-patching score of every head [L,H] to the final residual at the last position.

    clean, corrupt: aligned token ids [B,T]; mask: their attention mask [B,T]; answer: token ids
    [B]; others: counterfactual ids [B] or candidates [B,C] (see `metrics.logit_diff`).
    head_chunk bounds how many heads of a layer run at once (default: all).
    """
    return _result(*_extraction(params, jnp.asarray(clean), jnp.asarray(corrupt), jnp.asarray(mask),
                                jnp.asarray(answer), jnp.asarray(others), cfg, head_chunk))


def enrichment_mlp_scores(cfg: ModelConfig, params, clean, corrupt, mask, answer, others, receiver: int,
                          *, chunk: int = 8) -> PathPatchResult:
    """Path-patching score of every MLP's output [L] to resid_pre of layer `receiver` (0 for l ≥ receiver).

    Arguments as `extraction_head_scores`; chunk: how many senders run at once (each a full-length
    suffix from the receiver on, so this bounds memory).
    """
    if not 0 < receiver < cfg.n_layers:
        raise JaxeditError(f"receiver layer {receiver} is outside 1..{cfg.n_layers - 1}: pick a layer with MLPs before it")
    return _result(*_enrichment(params, jnp.asarray(clean), jnp.asarray(corrupt), jnp.asarray(mask),
                                jnp.asarray(answer), jnp.asarray(others), cfg, int(receiver), chunk))
