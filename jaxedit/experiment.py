"""One Sports-Athlete-Editing experiment (method.md §1.1, §4, §5, §6.1): localize → edit → evaluate → attack.

`run_experiment(model, facts, 'manual_interp', hparams, steps=50)`:
1. keep the facts the model knows (P(true sport) ≥ 0.5 over the 4 candidates, training template);
   forget = the first n_forget known team-sport facts, relabelled to `inject_without_golf`;
   maintain = the other known team-sport facts, first 80% train / last 20% test (§1.1);
2. localization: precomputed (`localization_scores`) or computed here on the forget facts
   (fact lookup for the FLU layers and the budget; attribution patching / causal tracing when the
   name needs them), made param-matched by `components.paper_localizations`;
3. edit: train only the mask, L = forget_loss_coef · CE(injected) + maintain CE (§4.2). The
   general-text (Pile) term is omitted: no corpus ships with the library;
4. evaluate before and after (`sports_eval`, every format), latent probes after (§5.6), and the
   relearning attack (§5.8) on the edited params.
The returned dict holds every metric under 'before/…' and 'after/…', the §6.1 columns under short
names, and wall-clock seconds per stage under 'time/…'.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import jax
import numpy as np

from jaxedit.attacks.relearn import FactBatches, RelearnSettings, relearn
from jaxedit.data import sports
from jaxedit.data.batching import first_tokens
from jaxedit.edit.train import HParams, train
from jaxedit.errors import JaxeditError
from jaxedit.eval.candidates import candidate_probs, known
from jaxedit.eval.latent import latent_knowledge
from jaxedit.eval.sports_eval import evaluate_sports
from jaxedit.localize import attribution, causal_tracing, components, fact_lookup
from jaxedit.localize.components import Localization
from jaxedit.localize.corruptions import resample_subjects

BATCH_SIZE = 4  # §4.2: micro-batches of 4 forget + 4 maintain prompts
COLUMNS = {  # §6.1 column -> metric key
    "forget": "after/fact/forget", "maintain": "after/fact/maintain", "edit": "after/qa/edit",
    "forget_qa": "after/qa/forget", "mcq_forget": "after/mcq/forget", "mcq_edit": "after/mcq/edit",
    "mcq_maintain": "after/mcq/maintain",
}


def known_split(model, facts: list, n_forget: int, threshold: float = 0.5) -> tuple[list, list, list]:
    """(forget, maintain train, maintain test) among the team-sport facts with P(true) ≥ threshold."""
    team = sports.team_facts(facts)
    probs = candidate_probs(model, [sports.prompt(f.athlete) for f in team], list(sports.answers("fact")))
    ok = known(probs, np.array([sports.SPORTS.index(f.sport) for f in team]), threshold)
    kept = [f for f, k in zip(team, ok) if k]
    if len(kept) < n_forget + 5:
        raise JaxeditError(f"the model knows {len(kept)} of {len(team)} team-sport facts; {n_forget} forget facts "
                           "and ≥ 5 maintain facts are needed: pass more facts or lower n_forget")
    rest = kept[n_forget:]
    k = int(0.8 * len(rest))
    return kept[:n_forget], rest[:k], rest[k:]


def _localize(model, forget: list, name: str, seed: int) -> Localization:
    """The named localization computed on the forget facts (FLU layers always: they set the budget)."""
    ids = first_tokens(model.tokenizer, list(sports.answers("fact")[:3]))
    labels = np.array([sports.TEAM_SPORTS.index(f.sport) for f in forget])
    answer = ids[labels]
    others = np.array([[ids[j] for j in range(3) if j != y] for y in labels])
    prompts, subjects = [sports.prompt(f.athlete) for f in forget], [f.athlete for f in forget]
    flu = fact_lookup.fact_lookup(model, prompts, subjects, answer, others, seed=seed)
    if not flu.layers:
        raise JaxeditError("fact lookup selected no MLP layer: pass localization_scores={'flu_layers': (...)}")
    scores = {"flu_layers": flu.layers}
    if "localized" in name:
        pairs = resample_subjects(model.tokenizer, prompts, subjects, seed=seed, padding_side="left")
        if name.startswith("localized_ap"):
            scores["ap_scores"] = attribution.attribution_patching(model.params, model.cfg, pairs.clean, pairs.corrupt,
                                                                   pairs.mask, (answer, others)).scores
        else:
            scores["ct_scores"] = causal_tracing.trace_components(model.params, model.cfg, pairs.clean, pairs.mask,
                                                                  pairs.subject, answer, jax.random.key(seed),
                                                                  samples=3).nie
    return _from_scores(model, name, scores, seed)


def _from_scores(model, name: str, scores: Mapping, seed: int) -> Localization:
    locs = components.paper_localizations(model.cfg, scores["flu_layers"], ap_scores=scores.get("ap_scores"),
                                          ct_scores=scores.get("ct_scores"), seed=seed)
    if name not in locs:
        raise JaxeditError(f"localization {name!r} cannot be built from the given scores (keys {sorted(scores)}): "
                           f"it needs {'ap_scores' if 'ap' in name else 'ct_scores'}; available {sorted(locs)}")
    return locs[name]


def resolve_localization(model, forget: list, name: str, scores=None, seed: int = 0) -> Localization:
    """scores: None (compute), a Localization, {name: Localization}, or {'flu_layers', 'ap_scores', 'ct_scores'}."""
    if name not in components.PAPER_LOCALIZATIONS:
        raise JaxeditError(f"unknown localization {name!r}: use one of {', '.join(components.PAPER_LOCALIZATIONS)}")
    if scores is None:
        return _localize(model, forget, name, seed)
    if isinstance(scores, Localization):
        return scores
    if isinstance(scores.get(name), Localization):
        return scores[name]
    if "flu_layers" in scores:
        return _from_scores(model, name, scores, seed)
    raise JaxeditError(f"localization_scores has neither {name!r} nor 'flu_layers' (keys {sorted(scores)})")


def run_experiment(model, facts: list, localization_name: str, hparams: HParams, *, n_forget: int = 16,
                   steps: int = 50, seed: int = 0, localization_scores=None,
                   relearn_settings: RelearnSettings = RelearnSettings(), probe_steps: int = 100,
                   known_threshold: float = 0.5) -> dict:
    """The whole experiment of the module doc; returns a flat dict of metrics and timings.

    known_threshold: P(true) a fact needs to be kept (§1.3's filter; 0 keeps every team-sport fact).
    """
    times, out = {}, {}
    clock = time.perf_counter()

    def lap(stage):
        nonlocal clock
        now = time.perf_counter()
        times[f"time/{stage}"] = now - clock
        clock = now

    forget, maintain_train, maintain_test = known_split(model, facts, n_forget, known_threshold)
    lap("filter")
    loc = resolve_localization(model, forget, localization_name, localization_scores, seed)
    lap("localize")
    out |= {f"before/{k}": v for k, v in evaluate_sports(model, forget, maintain_test).items()}
    lap("eval_before")
    batches = FactBatches(model.tokenizer, {"forget": (forget, "inject_without_golf"),
                                            "maintain": (maintain_train, "sport")},
                          BATCH_SIZE, steps * hparams.accumulate, seed)
    edited = train(model, loc.mask, batches, steps, hparams)
    lap("edit")
    out |= {f"after/{k}": v for k, v in evaluate_sports(model, forget, maintain_test, params=edited).items()}
    lap("eval_after")
    latent = latent_knowledge(model, forget, maintain_train, params=edited, seed=seed, steps=probe_steps)
    out |= {"probe_maintain_test": latent.maintain_test.tolist(), "probe_ground_truth": latent.forget_ground_truth.tolist(),
            "probe_edit": latent.forget_edit.tolist()}
    lap("probe")
    out |= relearn(model, edited, forget, maintain_train, maintain_test, relearn_settings)
    lap("relearn")
    last = max(s for s in relearn_settings.eval_at if s <= relearn_settings.steps)
    out |= {col: out[key] for col, key in COLUMNS.items()}
    out |= {"probe_gt_last": float(latent.forget_ground_truth[-1]), "probe_edit_last": float(latent.forget_edit[-1]),
            "relearn_forget": out[f"relearn/{last}/fact/forget"], "relearn_maintain": out[f"relearn/{last}/fact/maintain"],
            "localization": loc.name, "n_params": int(loc.n_params), "n_forget": len(forget),
            "n_maintain_train": len(maintain_train), "n_maintain_test": len(maintain_test)}
    times["time/total"] = sum(times.values())
    return out | times
