"""Attribution patching (AtP, spec §3.3) and the AtP* refinements (QK fix, GradDrop).

AtP estimates, for every component n at once, the effect of patching n's corrupted activation into
the clean run: score(n) = Σ_{batch, positions, dims} (a_corrupt − a_clean) · ∂M/∂a at the clean run,
with M the mean over prompts of a per-prompt metric of the last-position logits. The gradient is ONE
`jax.grad` with respect to zero-valued `SiteEdit(delta=...)`s at every requested site (parameters are
not differentiated), the clean activations come out of the same forward as `aux`, plus one forward on
the corrupted prompts: 2 forwards + 1 backward for all sites, over chunks of prompts (summed).

Scores (B batch, T positions, L layers, H heads, K kv heads, F d_mlp):
  attn_q [L,H], attn_k [L,K], attn_v [L,K]   (k/v per kv head, as the model computes them)
  attn_z [L,H]   the head's output. AtP of z equals AtP of the head's result z·W_O (TransformerLens
                 `hook_result`): W_O is linear, so Δresult·∂M/∂result = Δz·∂M/∂z exactly.
  mlp_in [L], mlp_out [L], mlp_hidden [L,F] (neurons), resid_pre/mid/post [L,T] (summed over the
  batch at each padded position index; with left padding, index T-1 is every prompt's last token).

Normalization (`normalize=True`): the paper's noising metric (M − M_clean)/(M_clean − M_corrupt) has
gradient ∂M/(M_clean − M_corrupt), so scores are divided by (M_clean − M_corrupt), with M_clean and
M_corrupt the means over ALL prompts (the paper normalizes per batch of 10 and averages the batches;
equal for one batch). Then −1 means "patching this component alone corrupts the metric fully".

AtP* options (Kramár et al. 2024):
  qk_fix:    queries and keys act on the metric only through the attention softmax, where the linear
             approximation fails when attention saturates. Instead, recompute each head's attention
             pattern exactly with the corrupted q (resp. k) and the clean other side, and take the
             linear approximation only after the softmax: Σ ΔA · ∂M/∂A. Since z = A·V, ∂M/∂A_ts =
             ∂M/∂z_t · v_s, so the score is Σ ∂M/∂z · Δz with Δz = (A_patched − A_clean)·V_clean; the
             gradient at z comes from the same backward pass. Components here are whole heads (all
             positions): for queries this equals the sum of the paper's per-position fixes (softmax
             rows are independent); for keys all positions of the kv head are patched together.
             A kv head's key score sums over the query heads of its group.
  grad_drop: cancellation between direct and indirect paths can hide a component. For every layer l,
             recompute the gradient with the backward pass through layer l's residual contributions
             (attn_out and mlp_out) stopped, giving AtP_l(n); the score is (1/(L−1)) Σ_l |AtP_l(n)|.
             Components of layer l itself get AtP_l(n) = 0 (their only route to the metric is cut),
             hence L−1. Scores are then magnitudes (≥ 0): the sign is lost by construction. The |·|
             is taken on the data-set score (sum over prompts), the quantity the localizer ranks; the
             paper takes it per prompt pair. The cut is an edit `where(layer == l, stop_gradient(clean
             value), act)` on attn_out and mlp_out: the forward is unchanged, the backward stops there.
             Costs 2 forwards + L+1 forward+backward passes per chunk (the extra one, with nothing
             dropped, gives the signed AtP scores, returned as `signed`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.interventions import SiteEdit
from jaxedit.localize import metrics
from jaxedit.models import core
from jaxedit.models.config import ModelConfig

HEAD_SITES = ("attn_q", "attn_k", "attn_v", "attn_z")
RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
ATTRIBUTION_SITES = HEAD_SITES + ("mlp_in", "mlp_out", "mlp_hidden") + RESID_SITES
DEFAULT_SITES = ("attn_q", "attn_k", "attn_v", "attn_z", "mlp_in", "mlp_out")
AXES = {
    "attn_q": ("layer", "head"), "attn_k": ("layer", "kv_head"), "attn_v": ("layer", "kv_head"),
    "attn_z": ("layer", "head"), "mlp_in": ("layer",), "mlp_out": ("layer",), "mlp_hidden": ("layer", "neuron"),
    "resid_pre": ("layer", "position"), "resid_mid": ("layer", "position"), "resid_post": ("layer", "position"),
}

Metric = Callable[[jax.Array, Any], jax.Array]  # (last-position logits [B,V], targets pytree [B,...]) -> [B]


def logit_diff_metric(logits: jax.Array, targets) -> jax.Array:
    """[B] logit difference; targets = (answer [B], others [B,C] or [B]) (metrics.logit_diff)."""
    answer, others = targets
    return metrics.logit_diff(logits, answer, others)


@dataclasses.dataclass(frozen=True)
class AttributionScores:
    """Scores per site (host arrays, axes named in `axes`), and the metric means they were scaled by."""

    scores: dict[str, np.ndarray]
    axes: dict[str, tuple[str, ...]]
    method: str  # "atp", "atp+qk", "atp+graddrop" or "atp*"
    metric_clean: float  # M over the clean prompts
    metric_corrupt: float  # M over the corrupted prompts
    normalized: bool  # scores divided by (metric_clean − metric_corrupt)
    signed: dict[str, np.ndarray] | None = None  # with grad_drop: the signed AtP (+QK fix) scores of the same run


def attribution_patching(
    params: dict,
    cfg: ModelConfig,
    clean,
    corrupt,
    attention_mask,
    targets,
    metric: Metric = logit_diff_metric,
    *,
    sites: tuple[str, ...] = DEFAULT_SITES,
    normalize: bool = True,
    qk_fix: bool = False,
    grad_drop: bool = False,
    chunk: int = 16,
    remat: bool = False,
) -> AttributionScores:
    """AtP scores of every component at `sites` for prompt pairs clean/corrupt [N,T] sharing attention_mask [N,T].

    targets: pytree of arrays with leading N, passed per chunk to `metric` (a module-level function,
    static under jit). Prompts are processed `chunk` at a time (the last chunk padded with zero-weight
    rows), all chunks in one compiled program; remat=True rematerializes each layer in the backward
    pass (less memory for large models).
    """
    _check(cfg, clean, corrupt, attention_mask, sites, grad_drop, chunk)
    n = int(np.shape(clean)[0])
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    rows = np.concatenate([np.arange(n), np.zeros(n_chunks * chunk - n, int)])
    weight = jnp.asarray(np.arange(n_chunks * chunk) < n, jnp.float32).reshape(n_chunks, chunk)

    def in_chunks(a):
        a = jnp.asarray(a)[rows]
        return a.reshape((n_chunks, chunk) + a.shape[1:])

    batches = (in_chunks(clean), in_chunks(corrupt), in_chunks(attention_mask), weight,
               jax.tree.map(in_chunks, targets))
    sums, clean_sum, corrupt_sum = _attribute(params, batches, cfg, metric, tuple(sites), qk_fix, grad_drop, remat)
    m_clean, m_corrupt = float(clean_sum) / n, float(corrupt_sum) / n
    if normalize and m_clean == m_corrupt:
        raise JaxeditError(f"clean and corrupted prompts give the same metric {m_clean}: the corruption does nothing "
                           "to normalize by; check the pairs or pass normalize=False")
    scale = n * (m_clean - m_corrupt if normalize else 1.0)
    totals = {site: np.asarray(total, np.float64) / scale for site, total in jax.device_get(sums).items()}
    signed = None
    if grad_drop:  # totals [L+1, L, ...]: row l has layer l dropped, row L nothing dropped
        signed = {site: total[-1] for site, total in totals.items()}
        totals = {site: np.abs(total[:-1]).sum(0) / (cfg.n_layers - 1) for site, total in totals.items()}
    method = {(False, False): "atp", (True, False): "atp+qk", (False, True): "atp+graddrop", (True, True): "atp*"}
    return AttributionScores(totals, {s: AXES[s] for s in sites}, method[qk_fix, grad_drop], m_clean, m_corrupt,
                             normalize, signed)


def _check(cfg, clean, corrupt, attention_mask, sites, grad_drop, chunk) -> None:
    unknown = sorted(set(sites) - set(ATTRIBUTION_SITES))
    if unknown or not sites:
        raise JaxeditError(f"attribution sites {unknown or '()'} not supported: "
                           f"choose from {', '.join(ATTRIBUTION_SITES)}")
    if not np.shape(clean) == np.shape(corrupt) == np.shape(attention_mask) or len(np.shape(clean)) != 2:
        raise JaxeditError(f"clean {np.shape(clean)}, corrupt {np.shape(corrupt)} and attention_mask "
                           f"{np.shape(attention_mask)} must all be [N,T]: align the prompt pairs token by token")
    if chunk < 1:
        raise JaxeditError(f"chunk={chunk}: give a positive number of prompts per chunk")
    if grad_drop and (cfg.n_layers < 2 or set(sites) & set(RESID_SITES)):
        raise JaxeditError("grad_drop scores head and MLP components of a model with >= 2 layers: "
                           "drop the resid sites or grad_drop")


def _site_shape(cfg: ModelConfig, site: str, b: int, t: int) -> tuple[int, ...]:
    features = {"attn_q": (cfg.n_heads, cfg.head_dim), "attn_z": (cfg.n_heads, cfg.head_dim),
                "attn_k": (cfg.n_kv_heads, cfg.head_dim), "attn_v": (cfg.n_kv_heads, cfg.head_dim),
                "mlp_hidden": (cfg.d_mlp,)}
    return (cfg.n_layers, b, t) + features.get(site, (cfg.d_model,))


def _reduce(site: str, product: jax.Array) -> jax.Array:
    """Sum an elementwise Δ·grad [L,B,T,...] down to the site's score axes."""
    if site in HEAD_SITES:
        return product.sum((1, 2, 4))
    if site in RESID_SITES:
        return product.sum((1, 3))
    return product.sum((1, 2)) if site == "mlp_hidden" else product.sum((1, 2, 3))


@partial(jax.jit, static_argnames=("cfg", "metric", "sites", "qk_fix", "grad_drop", "remat"))
def _attribute(params, batches, cfg, metric, sites, qk_fix, grad_drop, remat):
    """Σ over chunks of (per-site Δ·grad sums, weighted clean metric sum, weighted corrupt metric sum)."""
    chunk_fn = partial(_chunk, params, cfg, metric, sites, qk_fix, grad_drop, remat)
    per_chunk = jax.lax.map(chunk_fn, batches)
    return jax.tree.map(lambda a: a.sum(0), per_chunk)


def _chunk(params, cfg, metric, sites, qk_fix, grad_drop, remat, batch):
    clean, corrupt, mask, weight, targets = batch
    last = core.last_positions(mask)
    grad_sites = tuple(sorted(set(sites) | ({"attn_z"} if qk_fix else set())))
    capture = tuple(sorted(set(grad_sites) | ({"attn_q", "attn_k", "attn_v"} if qk_fix else set())))
    dtype = params["embed"]["tokens"].dtype
    zeros = {s: jnp.zeros(_site_shape(cfg, s, *clean.shape), dtype) for s in grad_sites}

    def run(tokens, edits, capture):
        logits, cache = core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=last,
                                     edits=edits, capture=capture, remat=remat)
        return metric(logits[:, 0], targets), cache

    def objective(deltas, dropped=None):
        edits = {s: SiteEdit(delta=d) for s, d in deltas.items()}
        if dropped is not None:  # GradDrop: forward unchanged, backward through layer l's contributions cut
            layer, held = dropped
            on = (jnp.arange(cfg.n_layers) == layer)[:, None, None, None]
            for s, value in held.items():
                edits[s] = SiteEdit(mask=on, value=jax.lax.stop_gradient(value), delta=deltas.get(s))
        m, cache = run(clean, edits, capture)
        return (m * weight).sum(), (m, cache)

    corrupt_m, corrupt_cache = run(corrupt, None, capture)
    if grad_drop:
        clean_m, clean_cache = run(clean, None, capture + ("attn_out", "mlp_out"))
        held = {s: clean_cache[s] for s in ("attn_out", "mlp_out")}
    else:
        (_, (clean_m, clean_cache)), grads = jax.value_and_grad(objective, has_aux=True)(zeros)
    diffs = {s: corrupt_cache[s] - clean_cache[s] for s in grad_sites}
    dz = _qk_delta_z(cfg, params, mask, clean_cache, corrupt_cache) if qk_fix else {}

    def scores(grads):
        out = {}
        for s in sites:
            if s in dz:
                out[s] = _reduce("attn_z", _f32(grads["attn_z"]) * _f32(dz[s]))
                if s == "attn_k":
                    out[s] = out[s].reshape(cfg.n_layers, cfg.n_kv_heads, -1).sum(-1)
            else:
                out[s] = _reduce(s, _f32(diffs[s]) * _f32(grads[s]))
        return out

    if grad_drop:
        def drop_layer(layer):  # layer == L drops nothing
            grads = jax.grad(lambda d: objective(d, (layer, held))[0])(zeros)
            own = jnp.arange(cfg.n_layers) == layer  # the own-layer term is 0 by definition (cut route)
            return {s: jnp.where(own.reshape((-1,) + (1,) * (v.ndim - 1)), 0.0, v) for s, v in scores(grads).items()}

        site_scores = jax.lax.map(drop_layer, jnp.arange(cfg.n_layers + 1))  # {site: [L+1, L, ...]}
    else:
        site_scores = scores(grads)
    return site_scores, (clean_m * weight).sum(), (corrupt_m * weight).sum()


def _f32(a: jax.Array) -> jax.Array:
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


class _Supplied(core.Sites):
    """Sites that return the given activations {site: [B,T,…]} in place of the computed ones."""

    def __init__(self, acts: dict[str, jax.Array]):
        super().__init__({}, ())
        self.acts = acts

    def __call__(self, name: str, act: jax.Array) -> jax.Array:
        return self.acts.get(name, act)


def _qk_delta_z(cfg, params, mask, clean_cache, corrupt_cache) -> dict[str, jax.Array]:
    """Δz [L,B,T,H,E] from each layer's attention recomputed exactly with corrupted q (resp. k), clean v.

    Uses the model's own attention (`core.attention`) with q/k/v supplied through its site hook, so
    q/k-norm, RoPE, scaling, soft-cap and (sliding) masks are exactly the forward's. Heads do not mix:
    corrupting every head's q (every kv head's k) at once gives each head's own single-head patch.
    """
    ctx = core.make_context(cfg, mask)
    consts = core.layer_constants(cfg)

    def layer(xs):
        p, inv_freq, is_local, q, k, v, q_new, k_new = xs

        def z(q, k):
            acts = {"attn_q": q, "attn_k": k, "attn_v": v}
            unused = jnp.zeros(q.shape[:2] + (cfg.d_model,), q.dtype)  # projections are replaced below
            return core.attention(cfg, p, unused, ctx, inv_freq, is_local, _Supplied(acts))

        base = z(q, k)
        return {"attn_q": z(q_new, k) - base, "attn_k": z(q, k_new) - base}

    c, r = clean_cache, corrupt_cache
    xs = (params["layers"]["attn"], consts.inv_freq, consts.is_local, c["attn_q"], c["attn_k"], c["attn_v"],
          r["attn_q"], r["attn_k"])
    return jax.lax.map(layer, xs)
