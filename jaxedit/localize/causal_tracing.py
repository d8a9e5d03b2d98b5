"""Causal tracing (spec §3.4; ROME): noise the subject's embeddings, restore clean activations.

Corrupted run: Gaussian noise on the subject's token embeddings (an `embed` delta,
`corruptions.subject_noise(key, subject, d_model, scale, samples)`, so the noise is reproducible from
the key), `samples` noise draws vmapped. A restore writes the clean value of a site (mask/value edit)
into every noised run. Metric: probability of the answer at the last position (full vocabulary, or
softmax over `candidates`).

Score = normalized indirect effect, per example b: NIE_b = (p_restored_b − p_corrupt_b) /
(p_clean_b − p_corrupt_b), where p_restored_b and p_corrupt_b are means over the noise samples (as
ROME averages its noised copies); `nie` is the mean of NIE_b over examples, `per_example` keeps
NIE_b (inf/nan for a prompt whose answer probability the noise does not move; p_clean and p_corrupt
are returned to filter such prompts). The paper's code indexed the softmax with every example's
answer at once and reduced batch means (spec §10.4); we do not copy that.

Noise scale (`corruptions.noise_scale`): 'rome' = 3·std of all the batch's subject embeddings,
'paper' = sqrt(3·std) of each example's own subject embeddings (§3.4), or a float for every example.

Sweeps are one compiled program: `lax.map` over groups of restore sets sharing a first restored
layer (the noised prefix below it is reused, `core.run_from`), `vmap` over the sets of a group (in
chunks of `chunk`) and over noise samples; only the last position is unembedded.
  trace_components: each head's output (attn_z of one head, all positions) and each layer's
                    mlp_out (all positions): the paper's localizer. {attn_z [L,H], mlp_out [L]}.
  trace_grid:       ROME's grid: one site (resid_pre, mlp_out, attn_out, ...) restored at one position
                    over a window of layers centred as in ROME, [max(0, l − w//2), min(L, l + ⌈w/2⌉)).
                    {site [L,T]} (padded position index; with left padding T-1 is the last token).
  trace_restore:    any restore sets: {site: bool [G,M,L,...]} masks broadcastable to the site.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.interventions import LAYER_SITES, SiteEdit
from jaxedit.localize import corruptions, metrics
from jaxedit.models import core
from jaxedit.models.config import ModelConfig

HEAD_SITES = ("attn_q", "attn_k", "attn_v", "attn_z")  # [B,T,N,E]; every other layer site is [B,T,features]


@dataclasses.dataclass(frozen=True)
class TracingScores:
    """NIE per restore (mean over examples) and per example (trailing B axis); host arrays."""

    nie: dict[str, np.ndarray]
    per_example: dict[str, np.ndarray]
    axes: dict[str, tuple[str, ...]]
    p_clean: np.ndarray  # [B]
    p_corrupt: np.ndarray  # [B] mean over noise samples
    noise_scale: np.ndarray  # [B] noise std per example
    samples: int


def trace_components(params, cfg: ModelConfig, tokens, attention_mask, subject, answer, key, *, candidates=None,
                     noise: str | float = "rome", samples: int = 10, chunk: int | None = None) -> TracingScores:
    """Restore each head's output and each MLP output, one at a time: {attn_z [L,H], mlp_out [L]}.

    tokens, attention_mask, subject (bool): [B,T]; answer [B]; candidates [B,C] or None; key: PRNG key.
    """
    n_layers, heads = cfg.n_layers, cfg.n_heads
    layer, head = np.arange(n_layers)[:, None], np.arange(heads)[None, :]
    head_mask = np.zeros((n_layers, heads + 1, n_layers, 1, 1, heads, 1), bool)  # set (l, h < H): head h of layer l
    head_mask[layer, head, layer, 0, 0, head, 0] = True
    mlp_mask = np.zeros((n_layers, heads + 1, n_layers, 1, 1, 1), bool)  # set (l, H): the MLP of layer l
    mlp_mask[layer[:, 0], heads, layer[:, 0]] = True
    restore = {"attn_z": head_mask, "mlp_out": mlp_mask}
    raw = trace_restore(params, cfg, tokens, attention_mask, subject, answer, key, restore, candidates=candidates,
                        noise=noise, samples=samples, chunk=chunk)
    per = raw.per_example["restore"]  # [L, H+1, B]
    per_example = {"attn_z": per[:, :heads], "mlp_out": per[:, heads]}
    return dataclasses.replace(raw, per_example=per_example, nie={k: v.mean(-1) for k, v in per_example.items()},
                               axes={"attn_z": ("layer", "head"), "mlp_out": ("layer",)})


def trace_grid(params, cfg: ModelConfig, tokens, attention_mask, subject, answer, key, *, site: str = "resid_pre",
               window: int = 1, candidates=None, noise: str | float = "rome", samples: int = 10,
               chunk: int | None = None) -> TracingScores:
    """ROME's layer × position grid: restore `site` at one position over `window` layers: {site [L,T]}."""
    if site not in LAYER_SITES or window < 1:
        raise JaxeditError(f"trace_grid(site={site!r}, window={window}): use a layer site "
                           f"({', '.join(LAYER_SITES)}) and window >= 1")
    n_layers, t = cfg.n_layers, np.shape(tokens)[1]
    centre = np.arange(n_layers)[:, None]
    layers = np.arange(n_layers)[None, :]
    in_window = (layers >= centre - window // 2) & (layers < centre - (-window // 2))  # [G=L, L]
    at = np.eye(t, dtype=bool)  # [M=T, T]
    mask = in_window[:, None, :, None, None] & at[None, :, None, None, :]  # [L, T, L, 1(B), T]
    mask = mask.reshape(mask.shape + (1,) * (2 if site in HEAD_SITES else 1))
    raw = trace_restore(params, cfg, tokens, attention_mask, subject, answer, key, {site: mask},
                        candidates=candidates, noise=noise, samples=samples, chunk=chunk)
    per_example = {site: raw.per_example["restore"]}
    return dataclasses.replace(raw, per_example=per_example, nie={site: per_example[site].mean(-1)},
                               axes={site: ("layer", "position")})


def trace_restore(params, cfg: ModelConfig, tokens, attention_mask, subject, answer, key, restore: dict, *,
                  candidates=None, noise: str | float = "rome", samples: int = 10,
                  chunk: int | None = None) -> TracingScores:
    """NIE of arbitrary restore sets: {"restore": [G,M]} (per example [G,M,B]).

    restore: {site: bool [G,M,L,...]}; after its [G,M] index a mask is [L, ...] with the trailing axes
    broadcasting to the site's activation [B,T,...] (e.g. [G,M,L,1,T,1] for resid_pre by position).
    Set (g, m) writes the clean value wherever its masks are True, in every noised run. The sets of a
    group g share the noised prefix below the group's first restored layer, so put sets that restore
    the same layers in one group.
    """
    tokens, mask, subject = (np.asarray(a) for a in (tokens, attention_mask, subject))
    restore = {site: np.asarray(m, bool) for site, m in restore.items()}
    _check(cfg, tokens, mask, subject, restore, samples)
    if isinstance(noise, str):
        scale = corruptions.noise_scale(params["embed"]["tokens"], tokens, subject, noise, cfg.embed_scale)
    else:
        scale = np.full(len(tokens), float(noise), np.float32)
    starts = _first_layers(cfg, restore)
    cand = None if candidates is None else jnp.asarray(candidates)
    p_clean, p_corrupt, p_restored = jax.device_get(_trace(
        params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(subject), jnp.asarray(answer), cand, key,
        scale, {s: jnp.asarray(m) for s, m in restore.items()}, jnp.asarray(starts), samples, chunk))
    p_corrupt, p_restored = p_corrupt.mean(0), p_restored.mean(2)  # over noise samples
    per_example = (p_restored - p_corrupt) / (p_clean - p_corrupt)  # [G,M,B]
    return TracingScores({"restore": per_example.mean(-1)}, {"restore": per_example}, {"restore": ("group", "set")},
                         p_clean, p_corrupt, scale, samples)


def _check(cfg, tokens, mask, subject, restore, samples) -> None:
    if tokens.ndim != 2 or not tokens.shape == mask.shape == subject.shape:
        raise JaxeditError(f"tokens {tokens.shape}, attention_mask {mask.shape} and subject {subject.shape} must all "
                           "be [B,T]")
    if not (subject & mask.astype(bool)).any(1).all():
        raise JaxeditError("every prompt needs at least one subject token to noise: fix the subject positions")
    if samples < 1:
        raise JaxeditError(f"samples={samples}: give at least one noise sample")
    for site, m in restore.items():
        if site not in LAYER_SITES or m.ndim < 3 or m.shape[2] != cfg.n_layers:
            raise JaxeditError(f"restore[{site!r}] of shape {m.shape}: use a layer site ({', '.join(LAYER_SITES)}) "
                               f"with a mask [G,M,{cfg.n_layers},...]")


def _first_layers(cfg, restore) -> np.ndarray:
    """[G] first layer any set of a group restores (the noised prefix below it is shared)."""
    hit = np.zeros((next(iter(restore.values())).shape[0], cfg.n_layers), bool)
    for m in restore.values():
        hit |= m.reshape(m.shape[:3] + (-1,)).any((1, 3))
    return np.where(hit.any(1), hit.argmax(1), cfg.n_layers - 1).astype(np.int32)


@partial(jax.jit, static_argnames=("cfg", "samples", "chunk"))
def _trace(params, cfg, tokens, mask, subject, answer, candidates, key, scale, restore, starts, samples, chunk):
    """p_clean [B], p_corrupt [S,B], p_restored [G,M,S,B]."""
    last = core.last_positions(mask)
    sites = tuple(restore)

    def prob(final):  # final residual [B,T,D] -> p [B]
        x = jnp.take_along_axis(final, last[..., None], axis=1)[:, 0]
        return metrics.on_residual(cfg, params, metrics.answer_prob, x, answer, candidates)

    def answer_prob(logits):
        return metrics.answer_prob(logits[:, 0], answer, candidates)

    clean_logits, clean = core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=last, capture=sites)
    noise = corruptions.subject_noise(key, subject, cfg.d_model, scale, samples)  # [S,B,T,D]

    def noised(delta):
        logits, cache = core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=last,
                                     edits={"embed": SiteEdit(delta=delta)}, capture=("resid_pre",))
        return answer_prob(logits), cache["resid_pre"]

    p_corrupt, resid_pre = jax.vmap(noised)(noise)  # [S,B], [S,L,B,T,D]
    ctx = core.make_context(cfg, mask)

    def group(xs):
        masks, start = xs  # masks {site: [M,L,...]}
        x = jax.lax.dynamic_index_in_dim(resid_pre, start, axis=1, keepdims=False)  # [S,B,T,D]

        def one_set(set_masks):
            edits = {s: SiteEdit(mask=set_masks[s], value=clean[s]) for s in sites}
            return jax.vmap(lambda xs: prob(core.run_from(cfg, params, xs, ctx, start, edits)))(x)  # [S,B]

        return jax.lax.map(one_set, masks, batch_size=chunk or next(iter(masks.values())).shape[0])

    return answer_prob(clean_logits), p_corrupt, jax.lax.map(group, (restore, starts))
