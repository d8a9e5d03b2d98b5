"""Activation-patching sweeps (method.md §3): one compiled program per sweep shape.

Denoising runs the corrupted prompts and writes in, one site at a time, the activation the clean
prompts produce there; noising runs the clean prompts and writes in the corrupted activation. The
source activations and the target run's residual stream are captured once. With prefix reuse a
patch at layer l starts from the target's cached `resid_pre[l]`, runs layer l with the edit
(`core.block`) and then only layers l+1..L-1 (`core.run_from`). A patch at position p also skips
positions before p, which causal attention keeps equal to the target run's: it needs rows p..T-1
only, reading the earlier positions' keys and values from the target's cache, and the patches at
p and T-1-p share one packed run of T+1 rows (`_pair_layout`), one static shape for every site.
Layers are a sequential `lax.map`, the sites (pairs) of one layer a `vmap` in chunks of
`chunk_size`. Only the last real position is unembedded. The score array reaches the host once.

Sites and their sweep axes (B batch, T positions, H heads, F d_mlp, L layers):
  resid_pre / resid_mid / resid_post / attn_out / mlp_out: (layer[, pos])
  attn_z (one head's output, all its positions):        (layer, head[, pos])
  mlp_hidden (one neuron):                               (layer, neuron[, pos])
`pos` is present when `by_position` (default: True for the residual stream, False otherwise); it
indexes the padded T axis, so padding positions score as the unpatched target run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.interventions import SiteEdit, one_layer_edit
from jaxedit.localize import metrics
from jaxedit.localize.corruptions import PromptPairs
from jaxedit.models import core
from jaxedit.models.config import ModelConfig
from jaxedit.sharding import on_data

RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
UNIT_AXIS = {"resid_pre": None, "resid_mid": None, "resid_post": None, "attn_out": None, "mlp_out": None,
             "attn_z": "head", "mlp_hidden": "neuron"}  # site -> the axis (index 2 of the activation) swept per unit
DIRECTIONS = ("denoise", "noise")


@dataclasses.dataclass(frozen=True)
class PatchingResult:
    """Patched metric per site. `scores` has axes `axes`; `per_example` has axes `axes + ("batch",)`.

    clean / corrupt: the unpatched metric of each prompt [B]; `normalized()` maps the batch-mean
    clean value to 1 and the corrupt one to 0, whatever the direction.
    """

    scores: np.ndarray
    per_example: np.ndarray
    axes: tuple[str, ...]
    clean: np.ndarray
    corrupt: np.ndarray
    site: str
    direction: str

    def normalized(self) -> np.ndarray:
        """(scores − mean corrupt) / (mean clean − mean corrupt), shaped like `scores`."""
        clean, corrupt = self.clean.mean(), self.corrupt.mean()
        return (self.scores - corrupt) / (clean - corrupt)


def patching_sweep(
    params: dict,
    cfg: ModelConfig,
    clean: PromptPairs | jax.Array,
    corrupt: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    *,
    metric: Callable[..., jax.Array],
    metric_args: tuple = (),
    site: str = "resid_pre",
    by_position: bool | None = None,
    direction: str = "denoise",
    chunk_size: int = 64,
    prefix_reuse: bool = True,
) -> PatchingResult:
    """Patch every (layer[, unit][, position]) of `site` in turn and score the last-position logits.

    clean, corrupt: token ids [B,T] aligned token by token, with their attention_mask [B,T]; or a
    `PromptPairs` as `clean` (then leave corrupt and attention_mask out). metric(logits [B,V],
    *metric_args) -> [B]; pass data (answer ids, ...) as `metric_args` so one compiled program
    serves every batch of the same shapes (a fresh `functools.partial` compiles anew).
    chunk_size: sites (position pairs, when by position) vmapped at once (bounds memory). prefix_reuse=False runs a full forward per
    site (the reference the benchmark compares with). The prompts shard over the 'data' axis of the mesh
    `params` live on (`sharding.on_data`).
    """
    clean, corrupt, attention_mask = _inputs(clean, corrupt, attention_mask)
    if site not in UNIT_AXIS:
        raise JaxeditError(f"cannot sweep site {site!r}: choose one of {', '.join(UNIT_AXIS)}")
    if direction not in DIRECTIONS:
        raise JaxeditError(f"unknown direction {direction!r}: use 'denoise' (clean into corrupt) "
                           "or 'noise' (corrupt into clean)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise JaxeditError(f"chunk_size must be a positive int, got {chunk_size!r}")
    by_position = site in RESID_SITES if by_position is None else bool(by_position)
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    target, source, attention_mask, metric_args = on_data(params, (target, source, attention_mask,
                                                                   tuple(jnp.asarray(a) for a in metric_args)))
    per_site, target_metric, source_metric = jax.device_get(_sweep(
        params, target, source, attention_mask, metric_args, cfg=cfg, metric=metric,
        site=site, by_position=by_position, chunk_size=chunk_size, prefix_reuse=prefix_reuse))
    denoise = direction == "denoise"
    clean_metric, corrupt_metric = (source_metric, target_metric) if denoise else (target_metric, source_metric)
    unit = UNIT_AXIS[site]
    axes = ("layer",) + ((unit,) if unit else ()) + (("pos",) if by_position else ())
    return PatchingResult(per_site.mean(-1), per_site, axes, clean_metric, corrupt_metric, site, direction)


def _inputs(clean, corrupt, attention_mask):
    """(clean, corrupt, mask) as int32 jax arrays [B,T], checked to be aligned."""
    if isinstance(clean, PromptPairs):
        if corrupt is not None or attention_mask is not None:
            raise JaxeditError("got PromptPairs and also corrupt/attention_mask: pass one or the other")
        clean, corrupt, attention_mask = clean.clean, clean.corrupt, clean.mask
    if corrupt is None or attention_mask is None:
        raise JaxeditError("patching needs clean and corrupt tokens and their attention_mask (or a PromptPairs)")
    clean, corrupt, attention_mask = (jnp.asarray(a, jnp.int32) for a in (clean, corrupt, attention_mask))
    if clean.ndim != 2 or clean.shape != corrupt.shape or clean.shape != attention_mask.shape:
        shapes = f"clean {clean.shape}, corrupt {corrupt.shape} and attention_mask {attention_mask.shape}"
        raise JaxeditError(f"{shapes} must all be [B,T] and equal: align the pairs token by token "
                           "(corruptions.resample_subjects)")
    return clean, corrupt, attention_mask


def _site_mask(unit: jax.Array, at_rows: jax.Array, act_ndim: int, n_units: int | None) -> jax.Array:
    """Bool mask broadcastable to an activation [B,R,...] selecting `unit` (if units) at rows at_rows [R]."""
    mask = at_rows.reshape((1, at_rows.shape[0]) + (1,) * (act_ndim - 2))
    if n_units is not None:
        mask = mask & (jnp.arange(n_units) == unit).reshape((1, 1, n_units) + (1,) * (act_ndim - 3))
    return mask


def _pair_layout(ctx: core.Context, first: jax.Array, t: int) -> tuple[jax.Array, jax.Array, core.Context]:
    """Two suffixes of the T positions packed into T+1 rows: first..T-1, then T-1-first..T-1.

    A patch at position p changes nothing before p (causal attention), so its run needs only the
    rows p..T-1; pairing p with T-1-p fills exactly T+1 rows. Returns the position each row holds
    [T+1], whether it is in the second suffix [T+1], and the packed context: positions [B,T+1],
    masks [B,T+1,T+(T+1)] over the target's T cached keys (those before the row's suffix) and then
    the packed rows (same suffix only).
    """
    second = t - 1 - first
    j = jnp.arange(t + 1)
    in_second = j >= t - first
    rows = jnp.where(in_second, second + j - (t - first), first + j)
    starts = jnp.where(in_second, second, first)

    def masks(allowed):  # [B,T,T] -> [B,T+1,2T+1]
        query = allowed[:, rows]
        cached = query & (jnp.arange(t)[None, :] < starts[:, None])[None]
        packed = query[:, :, rows] & (in_second[:, None] == in_second[None, :])[None]
        return jnp.concatenate([cached, packed], axis=-1)

    return rows, in_second, core.Context(ctx.positions[:, rows], masks(ctx.allowed_global), masks(ctx.allowed_local))


@functools.partial(jax.jit, static_argnames=("cfg", "metric", "site", "by_position", "chunk_size", "prefix_reuse"))
def _sweep(params, target, source, attention_mask, metric_args, *, cfg, metric, site, by_position, chunk_size,
           prefix_reuse):
    """(per-site metric [L, U?, T?, B], target metric [B], source metric [B])."""
    b, t = target.shape
    last = core.last_positions(attention_mask)  # [B,1]
    ctx = core.make_context(cfg, attention_mask)
    consts = core.layer_constants(cfg)

    def checked(out):
        if out.shape != (b,):
            raise JaxeditError(f"metric returned shape {out.shape}: it must map logits [B,V] to one value per "
                               "prompt [B]")
        return out

    def score(final):
        """Metric [B] of final residuals [B,D] (only the logit columns it reads, if it says which)."""
        return checked(metrics.on_residual(cfg, params, metric, final, *metric_args))

    def run(tokens, capture=(), edits=None):
        logits, cache = core.forward(params, tokens, cfg, attention_mask=attention_mask, logit_positions=last,
                                     capture=capture, edits=edits)
        return checked(metric(logits[:, 0], *metric_args)), cache

    target_metric, target_cache = run(target, ("resid_pre", "resid_post") if prefix_reuse else ())
    source_metric, source_cache = run(source, (site,))
    values = source_cache[site]  # [L,B,T,...]
    unit = UNIT_AXIS[site]
    n_units = values.shape[3] if unit else None  # [L,B,T,U,...]
    paired = by_position and prefix_reuse
    if paired:
        cached_kv = jax.lax.map(lambda a: core.keys_values(cfg, a[0], a[1], ctx.positions, a[2]),
                                (params["layers"], target_cache["resid_pre"], consts.inv_freq))  # [L,B,T,K,E] each
        target_final = jnp.take_along_axis(target_cache["resid_post"][-1], last[..., None], axis=1)  # [B,1,D]
    n_pairs = (t + 1) // 2

    def layer_scores(layer):
        take = lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)  # noqa: E731
        value, layer_params = take(values), jax.tree.map(take, params["layers"])

        def patched_block(x, ctx, mask, value, rows, prefix=None):
            """Layer `layer` on the target's cached input x with the patch, then the unpatched layers after it:
            the final residual [B,Q,D] at rows [B,Q]."""
            x = core.block(cfg, layer_params, x, ctx, take(consts.inv_freq), take(consts.is_local),
                           core.Sites({site: SiteEdit(mask, value)}, ()), jax.tree.map(take, prefix))
            return core.run_from(cfg, params, x, ctx, layer + 1, prefix=prefix, rows=rows)

        def patched_layers(i):
            """Site i (all positions, or one of T), recomputing layers layer..L-1 only: [B]."""
            unit_index, pos = jnp.divmod(i, t) if by_position else (i, None)
            at_rows = jnp.arange(t) == pos if by_position else jnp.ones((t,), bool)
            mask = _site_mask(unit_index, at_rows, value.ndim, n_units)
            return score(patched_block(take(target_cache["resid_pre"]), ctx, mask, value, last)[:, 0])

        def patched_pair(i):
            """Positions p and T-1-p of one unit in T+1 packed rows, layers layer..L-1 only: [2,B]."""
            unit_index, first = jnp.divmod(i, n_pairs)
            rows, in_second, packed = _pair_layout(ctx, first, t)
            at_rows = rows == jnp.where(in_second, t - 1 - first, first)
            starts = jnp.array([0, 1]) * (t - 1 - 2 * first) + first  # [2] first, T-1-first
            offsets = jnp.array([0, 1]) * (t - first)  # [2] where each suffix begins in the packed rows
            reached = last >= starts  # [B,2]: prompts ending before a patch keep the target's final residual
            final = patched_block(take(target_cache["resid_pre"])[:, rows], packed,
                                  _site_mask(unit_index, at_rows, value.ndim, n_units), value[:, rows],
                                  jnp.clip(last - starts + offsets, 0, t), cached_kv)  # [B,2,D]
            final = jnp.where(reached[..., None], final, target_final)
            return jnp.stack([score(final[:, 0]), score(final[:, 1])])

        def patched_forward(i):
            """Site i with a full forward: [B]."""
            unit_index, pos = jnp.divmod(i, t) if by_position else (i, None)
            at_rows = jnp.arange(t) == pos if by_position else jnp.ones((t,), bool)
            mask = _site_mask(unit_index, at_rows, value.ndim, n_units)
            return run(target, edits=one_layer_edit(site, layer, cfg.n_layers, mask, value))[0]

        n_sites = (n_units or 1) * (t if by_position else 1)
        if not paired:
            per_site = patched_layers if prefix_reuse else patched_forward
            return jax.lax.map(per_site, jnp.arange(n_sites), batch_size=chunk_size)  # [n_sites, B]
        pairs = jax.lax.map(patched_pair, jnp.arange((n_units or 1) * n_pairs), batch_size=chunk_size)
        pairs = pairs.reshape(n_units or 1, n_pairs, 2, b)
        later = pairs[:, ::-1, 1][:, 2 * n_pairs - t:]  # positions T-n_pairs..T-1, minus the middle one if T is odd
        return jnp.concatenate([pairs[:, :, 0], later], axis=1).reshape(n_sites, b)

    scores = jax.lax.map(layer_scores, jnp.arange(cfg.n_layers))
    shape = (cfg.n_layers,) + ((n_units,) if unit else ()) + ((t,) if by_position else ()) + (b,)
    return scores.reshape(shape), target_metric, source_metric
