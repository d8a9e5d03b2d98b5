"""Every localization of the paper on one model and one sports-fact set, written to a directory.

`localize_sports(model, out_dir)` keeps the facts the model knows, then runs fact lookup (probes,
extraction heads, enrichment MLPs, layer selection), attribution patching, causal tracing and an
activation-patching sweep of MLP outputs (to check AtP's MLP ranking), turns the scores into the
nine param-matched localizations of §3.5–3.6, and writes labelled score arrays (NPZ + JSON),
heatmaps (PNG), `summary.json` and `summary.md`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxedit.data import sports
from jaxedit.data.batching import first_tokens
from jaxedit.errors import JaxeditError
from jaxedit.eval.candidates import candidate_probs, known
from jaxedit.localize import activation_patching, attribution, causal_tracing, components, fact_lookup, metrics
from jaxedit.localize.artifacts import ScoreArray, data_hash, save_heatmap
from jaxedit.localize.corruptions import resample_subjects


@dataclasses.dataclass(frozen=True)
class LocalizeSettings:
    """What to run: facts patched/traced (`n_facts`), probe facts (`n_probe`), seeds, CT noise samples."""

    n_facts: int = 24
    n_probe: int = 300
    seed: int = 0
    threshold: float = 0.02
    ct_samples: int = 3
    ct_noise: str = "rome"
    rule: str = "fill"


def _say(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score vectors (no ties expected in float scores)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _label_tokens(model, facts):
    """(answer ids [N], other team sports' ids [N,2], class labels [N]) for team-sport facts."""
    ids = first_tokens(model.tokenizer, list(sports.answers("fact")[:3]))
    labels = np.array([sports.TEAM_SPORTS.index(f.sport) for f in facts])
    others = np.array([[ids[j] for j in range(3) if j != label] for label in labels])
    return ids[labels], others, labels


def localize_sports(model, out_dir: str | Path, settings: LocalizeSettings = LocalizeSettings(), model_name: str = "",
                    facts=None) -> dict:
    """Run every localization; write artifacts under out_dir; return the summary dict."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, params, tok = model.cfg, model.params, model.tokenizer
    facts = sports.team_facts(sports.load_sports() if facts is None else facts)
    prompts = [sports.prompt(f.athlete) for f in facts]
    probs = candidate_probs(model, prompts, list(sports.answers("fact")))
    labels_all = np.array([sports.SPORTS.index(f.sport) for f in facts])
    is_known = known(probs, labels_all)
    chosen = [f for f, k in zip(facts, is_known) if k][: settings.n_facts]
    if len(chosen) < 2:
        raise JaxeditError(f"the model knows {len(chosen)} of {len(facts)} facts (p ≥ 0.5 over the candidates): "
                           "localization needs at least 2; use a stronger model or another fact set")
    _say(f"{int(is_known.sum())}/{len(facts)} facts known (p ≥ 0.5 over the 4 sports); patching {len(chosen)}", start)

    probe_facts = facts[: settings.n_probe]
    ordered = chosen + [f for f in probe_facts if f not in chosen]
    answer, others, labels = _label_tokens(model, ordered)
    subjects = [f.athlete for f in ordered]
    prompts = [sports.prompt(f.athlete) for f in ordered]
    tag = data_hash(subjects)
    flu = fact_lookup.fact_lookup(model, prompts, subjects, answer, others, labels=labels,
                                  probe_rows=np.arange(len(ordered)), patch_rows=np.arange(len(chosen)),
                                  seed=settings.seed, threshold=settings.threshold)
    _say(f"fact lookup: receiver layer {flu.receiver}, selected MLP layers {list(flu.layers)}", start)

    n = len(chosen)
    pairs = resample_subjects(tok, prompts[:n], subjects[:n], seed=settings.seed, padding_side="left")
    targets = (answer[:n], others[:n])
    atp = attribution.attribution_patching(params, cfg, pairs.clean, pairs.corrupt, pairs.mask, targets)
    _say(f"attribution patching: clean LD {atp.metric_clean:.2f}, corrupt LD {atp.metric_corrupt:.2f}", start)

    ct = causal_tracing.trace_components(params, cfg, pairs.clean, pairs.mask, pairs.subject, answer[:n],
                                         jax.random.key(settings.seed), noise=settings.ct_noise,
                                         samples=settings.ct_samples)
    _say(f"causal tracing: p_clean {ct.p_clean.mean():.3f}, p_noised {ct.p_corrupt.mean():.3f}", start)

    patched = activation_patching.patching_sweep(params, cfg, pairs, metric=metrics.logit_diff, metric_args=targets,
                                                 site="mlp_out", direction="noise")
    mlp_effect = patched.scores - patched.clean.mean()
    rho = spearman(atp.scores["mlp_out"], mlp_effect)
    _say(f"activation patching of MLP outputs (noising): Spearman ρ with AtP mlp_out = {rho:.3f}", start)

    locs = components.paper_localizations(cfg, flu.layers, ap_scores=atp.scores, ct_scores=ct.nie,
                                          seed=settings.seed, rule=settings.rule)
    _say("localizations: " + ", ".join(f"{k} {v.n_params / 1e6:.1f}M" for k, v in locs.items()), start)

    arrays = fact_lookup.score_arrays(flu, model=model_name, data_hash=tag)
    label = dict(model=model_name, data_hash=tag)
    for site, values in atp.scores.items():
        arrays[f"atp_{site}"] = ScoreArray(values, atp.axes[site], f"attribution/{atp.method}", **label)
    for site, values in ct.nie.items():
        arrays[f"ct_{site}"] = ScoreArray(values, ct.axes[site], "causal_tracing/nie", **label)
    arrays["patching_mlp_out"] = ScoreArray(mlp_effect, ("layer",), "activation_patching/noise", **label)
    for name, array in arrays.items():
        array.save(out_dir / "scores" / name)
        if array.values.ndim in (1, 2):
            save_heatmap(array, out_dir / "plots" / f"{name}.png", title=name)
    (out_dir / "masks").mkdir(exist_ok=True)
    for name, loc in locs.items():  # broadcasting bool leaves, keyed by their params path
        leaves = {"/".join(path): np.asarray(leaf) for path, leaf in components.mask_leaves(loc.mask)}
        np.savez_compressed(out_dir / "masks" / f"{name}.npz", **leaves)
    summary = _summary(model_name, settings, facts, is_known, chosen, flu, atp, ct, rho, locs,
                       time.perf_counter() - start)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(_markdown(summary))
    _say(f"wrote {out_dir}/summary.md", start)
    return summary


def _top(values: np.ndarray, k: int, names) -> list[dict]:
    flat = np.argsort(-np.abs(values), axis=None)[:k]
    return [{"component": names(np.unravel_index(i, values.shape)), "score": round(float(values.flat[i]), 4)}
            for i in flat]


def _summary(model_name, settings, facts, is_known, chosen, flu, atp, ct, rho, locs, seconds) -> dict:
    head = lambda idx: f"L{idx[0]}.H{idx[1]}"  # noqa: E731
    probe = lambda r: None if r is None else [round(float(a), 3) for a in r.test_accuracy]  # noqa: E731
    return {
        "model": model_name, "settings": dataclasses.asdict(settings), "seconds": round(seconds, 1),
        "facts": len(facts), "known": int(is_known.sum()), "patched": [f.athlete for f in chosen],
        "probe_accuracy_prompt": probe(flu.probe_prompt), "probe_accuracy_name": probe(flu.probe_name),
        "extraction_heads_top": _top(flu.extraction.scores, 8, head), "receiver_layer": flu.receiver,
        "enrichment_mlps": [round(float(s), 4) for s in flu.enrichment.scores],
        "fact_lookup_layers": list(flu.layers),
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
    lines = [f"# Localization of {s['model']} on sports facts", "",
             f"{s['known']} of {s['facts']} team-sport facts known; {len(s['patched'])} patched/traced; "
             f"{s['seconds']} s.", "", "## Probe test accuracy per layer (subject's last token)", "",
             "| layer | " + " | ".join(str(i) for i in range(len(s["probe_accuracy_prompt"] or []))) + " |",
             "|---|" + "---|" * len(s["probe_accuracy_prompt"] or []),
             "| prompt | " + " | ".join(str(a) for a in s["probe_accuracy_prompt"] or []) + " |",
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
