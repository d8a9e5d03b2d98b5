"""The localization pipeline of the paper (§3) on any task's facts: scores, then the nine localizations.

`localize(model, inputs, names, settings)` runs what the localizations `names` need on one fact
set: fact lookup (§3.2: path patching picks the enrichment MLP layers, which also set the
parameter budget; probes when labels are given), attribution patching (§3.3) and causal tracing
(§3.4) on subject-resampled pairs. `Localized.scores()` is what `components.paper_localizations`
turns into param-matched masks. The sweep (`jaxedit.experiment.prepare`) and
`python -m jaxedit.localize` (which also writes every score array, heatmaps, masks and a summary:
`write_artifacts`) both run it. A task gives the inputs (`Task.localization_inputs`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxedit.models.registry import paper_model
from jaxedit.errors import JaxeditError
from jaxedit.localize import activation_patching, attribution, causal_tracing, components, fact_lookup, metrics
from jaxedit.localize.artifacts import ScoreArray, data_hash, save_heatmap
from jaxedit.localize.corruptions import NOISE_KINDS, resample_subjects


@dataclasses.dataclass(frozen=True)
class LocalizeSettings:
    """How the localizations are computed (§3); `flu_layers` set skips fact lookup."""

    flu_layers: tuple[int, ...] | str | None = None  # null: fact lookup picks them; 'paper': `paper_flu_layers`
    threshold: float = 0.02  # fact lookup: enrichment-score threshold of a selected MLP layer (§3.2)
    top_k_heads: int = 10  # fact lookup: extraction heads whose earliest layer is the receiver
    ct_samples: int = 3  # causal-tracing noise samples
    ct_noise: str = "rome"  # causal-tracing noise: 'rome' (3·std) or 'paper' (sqrt(3·std) per example, §3.4)
    rule: str = "fill"  # budget rule: 'fill' (ours) or 'threshold' (the paper's, §10.9)

    def __post_init__(self):
        if isinstance(self.flu_layers, str) and self.flu_layers != "paper":
            raise JaxeditError(f"localize.flu_layers {self.flu_layers!r}: give a list of MLP layers, 'paper' or null")
        if self.ct_noise not in NOISE_KINDS:
            raise JaxeditError(f"localize.ct_noise {self.ct_noise!r}: use one of {', '.join(NOISE_KINDS)}")


@dataclasses.dataclass(frozen=True)
class LocalizationInputs:
    """What localization reads of N facts (a task builds it).

    prompts, subjects: one per fact; answer: the true answer's token id [N]; others: competing
    answers' ids [N,C] (logit-difference metric); labels: class per fact [N] for fact lookup's
    probes, or None (no probes); setting: the paper's setting of these facts ('sports',
    'counterfact_0_64', …: `fact_lookup.PAPER_FLU_LAYERS`), or None where the paper has none.
    """

    prompts: list[str]
    subjects: list[str]
    answer: np.ndarray
    others: np.ndarray
    labels: np.ndarray | None = None
    setting: str | None = None


@dataclasses.dataclass(frozen=True)
class Localized:
    """The results of `localize`: FLU layers and whichever of fact lookup / AtP / CT ran."""

    flu_layers: tuple[int, ...]
    flu: fact_lookup.FactLookup | None = None
    atp: attribution.AttributionScores | None = None
    ct: causal_tracing.TracingScores | None = None

    def scores(self) -> dict:
        """{'flu_layers', 'ap_scores'?, 'ct_scores'?}: per-site numpy score arrays."""
        out = {"flu_layers": self.flu_layers}
        if self.atp is not None:
            out["ap_scores"] = jax.tree.map(np.asarray, self.atp.scores)
        if self.ct is not None:
            out["ct_scores"] = jax.tree.map(np.asarray, self.ct.nie)
        return out


def needs(names) -> set[str]:
    """Score methods ('ap', 'ct') that the localizations `names` are built from."""
    return {"ap" if n.startswith("localized_ap") else "ct" for n in names if n.startswith("localized_")}


def localize(model, inputs: LocalizationInputs, names=components.PAPER_LOCALIZATIONS,
             settings: LocalizeSettings = LocalizeSettings(), seed: int = 0,
             probe_inputs: LocalizationInputs | None = None) -> Localized:
    """What `names` need, computed on `inputs` (the facts to edit).

    probe_inputs: more facts on which, with `inputs`, fact lookup's probes are trained (both need
    labels; None: no probes, which describe the model but do not choose layers). seed: the subject resampling of the corrupted prompts and the causal-tracing noise.
    """
    flu, layers = None, settings.flu_layers
    if layers == "paper":
        layers = paper_flu_layers(model, inputs.setting)
    if layers is None:
        rows = inputs if probe_inputs is None else _concat(inputs, probe_inputs)
        flu = fact_lookup.fact_lookup(model, rows.prompts, rows.subjects, rows.answer, rows.others,
                                      labels=None if probe_inputs is None else rows.labels, patch_rows=np.arange(len(inputs.prompts)), seed=seed,
                                      threshold=settings.threshold, top_k_heads=settings.top_k_heads)
        if not flu.layers:
            raise JaxeditError("fact lookup selected no MLP layer: set localize.flu_layers (e.g. [2, 3, 6])")
        layers = flu.layers
    need = needs(names)
    atp = ct = None
    if need:
        pairs = corrupted_pairs(model, inputs, seed)
    if "ap" in need:
        atp = attribution.attribution_patching(model.params, model.cfg, pairs.clean, pairs.corrupt, pairs.mask,
                                               (inputs.answer, inputs.others))
    if "ct" in need:
        ct = causal_tracing.trace_components(model.params, model.cfg, pairs.clean, pairs.mask, pairs.subject,
                                             inputs.answer, jax.random.key(seed), noise=settings.ct_noise,
                                             samples=settings.ct_samples)
    return Localized(tuple(int(layer) for layer in layers), flu, atp, ct)


def paper_flu_layers(model, setting: str | None) -> tuple[int, ...]:
    """§3.2's FLU layers of the paper model `model` is (named by its directory, e.g. …/gemma-2-9b) in `setting`."""
    name = paper_model(str(model.source or ""))
    if name not in fact_lookup.PAPER_FLU_LAYERS:
        raise JaxeditError(f"localize.flu_layers=paper: the paper used no model named {name!r} (its models: "
                           f"{', '.join(fact_lookup.PAPER_FLU_LAYERS)}; the model directory's name says which): "
                           "give the layers as a list, or null for fact lookup")
    if setting is None:
        raise JaxeditError("localize.flu_layers=paper: the paper has no FLU layers for these facts (its settings: "
                           f"{', '.join(fact_lookup.PAPER_FLU_LAYERS[name])}): give the layers as a list")
    return fact_lookup.paper_flu_layers(name, setting)


def corrupted_pairs(model, inputs: LocalizationInputs, seed: int):
    """Clean / subject-resampled prompts, left-padded (`corruptions.resample_subjects`)."""
    return resample_subjects(model.tokenizer, inputs.prompts, inputs.subjects, seed=seed, padding_side="left")


def _concat(a: LocalizationInputs, b: LocalizationInputs) -> LocalizationInputs:
    if a.labels is None or b.labels is None:
        raise JaxeditError("probe facts need class labels: this task's facts have none")
    return LocalizationInputs(a.prompts + b.prompts, a.subjects + b.subjects, np.concatenate([a.answer, b.answer]),
                              np.concatenate([a.others, b.others]), np.concatenate([a.labels, b.labels]))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score vectors (no ties expected in float scores)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def mlp_patching_check(model, inputs: LocalizationInputs, localized: Localized, seed: int) -> tuple[np.ndarray, float]:
    """(activation-patching effect of each MLP output [L] (noising), its Spearman ρ with AtP's mlp_out)."""
    pairs = corrupted_pairs(model, inputs, seed)
    patched = activation_patching.patching_sweep(model.params, model.cfg, pairs, metric=metrics.logit_diff,
                                                 metric_args=(inputs.answer, inputs.others), site="mlp_out",
                                                 direction="noise")
    effect = np.asarray(patched.scores - patched.clean.mean())
    return effect, spearman(np.asarray(localized.atp.scores["mlp_out"]), effect)


def write_artifacts(out_dir: str | Path, localized: Localized, locs: dict, inputs: LocalizationInputs,
                    summary: dict, mlp_effect: np.ndarray, model_name: str = "") -> None:
    """Labelled score arrays (NPZ + JSON), heatmaps (PNG), masks and `summary.json` / `summary.md` in out_dir."""
    out_dir = Path(out_dir)
    tag = data_hash(inputs.subjects)
    arrays = fact_lookup.score_arrays(localized.flu, model=model_name, data_hash=tag) if localized.flu else {}
    label = dict(model=model_name, data_hash=tag)
    for site, values in localized.atp.scores.items():
        arrays[f"atp_{site}"] = ScoreArray(values, localized.atp.axes[site], f"attribution/{localized.atp.method}",
                                           **label)
    for site, values in localized.ct.nie.items():
        arrays[f"ct_{site}"] = ScoreArray(values, localized.ct.axes[site], "causal_tracing/nie", **label)
    arrays["patching_mlp_out"] = ScoreArray(mlp_effect, ("layer",), "activation_patching/noise", **label)
    for name, array in arrays.items():
        array.save(out_dir / "scores" / name)
        if array.values.ndim in (1, 2):
            save_heatmap(array, out_dir / "plots" / f"{name}.png", title=name)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    for name, loc in locs.items():  # broadcasting bool leaves, keyed by their params path
        leaves = {"/".join(path): np.asarray(leaf) for path, leaf in components.mask_leaves(loc.mask)}
        np.savez_compressed(out_dir / "masks" / f"{name}.npz", **leaves)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(_markdown(summary))


def _top(values: np.ndarray, k: int, names) -> list[dict]:
    flat = np.argsort(-np.abs(values), axis=None)[:k]
    return [{"component": names(np.unravel_index(i, values.shape)), "score": round(float(values.flat[i]), 4)}
            for i in flat]


def summary(localized: Localized, locs: dict, rho: float, facts: dict) -> dict:
    """The summary dict of a localization run; `facts`: counts and names of the facts it ran on."""
    flu, atp, ct = localized.flu, localized.atp, localized.ct
    head = lambda idx: f"L{idx[0]}.H{idx[1]}"  # noqa: E731
    probe = lambda r: None if r is None else [round(float(a), 3) for a in r.test_accuracy]  # noqa: E731
    return facts | {
        "probe_accuracy_prompt": probe(flu.probe_prompt), "probe_accuracy_name": probe(flu.probe_name),
        "extraction_heads_top": _top(flu.extraction.scores, 8, head), "receiver_layer": flu.receiver,
        "enrichment_mlps": [round(float(s), 4) for s in flu.enrichment.scores],
        "fact_lookup_layers": list(localized.flu_layers),
        "atp_mlp_out": [round(float(s), 4) for s in atp.scores["mlp_out"]],
        "atp_heads_top": _top(atp.scores["attn_z"], 8, head),
        "ct_mlp_out": [round(float(s), 4) for s in ct.nie["mlp_out"]],
        "ct_heads_top": _top(ct.nie["attn_z"], 8, head),
        "atp_vs_patching_mlp_spearman": round(rho, 3),
        "localizations": {name: {"params": int(loc.n_params), "budget": loc.budget,
                                 "components": loc.components.labels()} for name, loc in locs.items()},
    }


def _listed(top: list[dict]) -> str:
    return ", ".join(f"{t['component']} {t['score']}" for t in top)


def _markdown(s: dict) -> str:
    accuracy = s["probe_accuracy_prompt"] or []
    lines = [f"# Localization of {s['model']} on {s['task']} facts", "",
             f"{s['known']} of {s['facts']} facts known; {len(s['patched'])} patched/traced; "
             f"{s['seconds']} s.", "", "## Probe test accuracy per layer (subject's last token)", "",
             "| layer | " + " | ".join(str(i) for i in range(len(accuracy))) + " |",
             "|---|" + "---|" * len(accuracy),
             "| prompt | " + " | ".join(str(a) for a in accuracy) + " |",
             "| name only | " + " | ".join(str(a) for a in s["probe_accuracy_name"] or []) + " |", "",
             f"Extraction heads (top): {_listed(s['extraction_heads_top'])}; "
             f"receiver layer {s['receiver_layer']}.", "",
             f"Enrichment MLP scores: {s['enrichment_mlps']}", "",
             f"**Fact-lookup layers: {s['fact_lookup_layers']}**", "",
             f"AtP mlp_out: {s['atp_mlp_out']}", "", f"CT mlp_out NIE: {s['ct_mlp_out']}", "",
             f"AtP vs activation patching (MLP outputs, noising): Spearman ρ = {s['atp_vs_patching_mlp_spearman']}", "",
             "## Localizations (param-matched to the fact-lookup budget)", "",
             "| localization | trainable params | components |", "|---|---|---|"]
    for name, loc in s["localizations"].items():
        shown = ", ".join(loc["components"][:12]) + (" …" if len(loc["components"]) > 12 else "")
        lines.append(f"| {name} | {loc['params']:,} | {shown} |")
    lines += ["", "Score arrays: `scores/*.npz|json`; heatmaps: `plots/*.png`; trainable masks (params-path -> "
              "broadcasting bool array): `masks/<localization>.npz`."]
    return "\n".join(lines) + "\n"
