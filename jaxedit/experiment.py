"""One experiment of the paper (method.md §4–§6): localize → edit → evaluate → attack, for any task.

`run_experiment(model, task, split, 'manual_interp', settings)`:
1. localization: the named one of `components.paper_localizations`, built from scores computed
   on the forget facts (`localization_scores`: fact lookup picks the FLU layers, which also set
   the parameter budget; attribution patching / causal tracing when a name needs them) or given;
2. edit: train only the mask, L = forget_coef · CE(injected) + maintain CE + general-text LM CE
   (+ optional KL to the original) (§4.2); sequential editing (§4.5) when `split.partitions`;
3. evaluate before and after in every format of the task, latent probes (§5.6, sports), side
   effects on general text (CE, next-token accuracy, KL to the original) and MMLU if given;
4. attacks on the edited params: relearning (§5.8) and soft prompts (§5.7).
The returned dict holds every metric under 'before/…' and 'after/…', the §6 columns under short
names, the §4.4 selection score, and wall-clock seconds per stage under 'time/…'.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxedit.attacks.relearn import RelearnSettings, relearn, split_forget
from jaxedit.data.batching import PromptBatches
from jaxedit.edit.train import HParams, train
from jaxedit.errors import JaxeditError
from jaxedit.localize import attribution, causal_tracing, components, fact_lookup
from jaxedit.localize.components import Localization
from jaxedit.localize.corruptions import resample_subjects

BATCH_SIZE = 4  # §4.2: micro-batches of 4 forget + 4 maintain prompts


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one experiment runs besides the localization: training, evaluation and attacks."""

    hparams: HParams = HParams()
    steps: int = 50
    batch_size: int = BATCH_SIZE
    probe_steps: int = 100  # 0: no latent probes
    relearn: RelearnSettings | None = RelearnSettings()
    soft_prompt: object | None = None  # attacks.soft_prompt.SoftPromptSettings
    mmlu_dir: str | None = None
    mmlu_limit: int | None = None
    checkpoint_every: int = 5  # optimizer steps between orbax checkpoints of in-flight training
    seed: int = 0


def _needs(names) -> set[str]:
    return {"ap" if n.startswith("localized_ap") else "ct" for n in names if n.startswith("localized_")}


def localization_scores(model, task, facts: list, names=components.PAPER_LOCALIZATIONS, *, seed: int = 0,
                        flu_layers=None, ct_samples: int = 3) -> dict:
    """{'flu_layers', 'ap_scores'?, 'ct_scores'?}: what `names` need, computed on `facts` (the forget set)."""
    prompts, subjects, answer, others = task.localization_inputs(model, facts)
    if flu_layers is None:
        flu = fact_lookup.fact_lookup(model, prompts, subjects, answer, others, seed=seed)
        if not flu.layers:
            raise JaxeditError("fact lookup selected no MLP layer: set localize.flu_layers (e.g. [2, 3, 6])")
        flu_layers = flu.layers
    scores = {"flu_layers": tuple(int(layer) for layer in flu_layers)}
    need = _needs(names)
    if need:
        pairs = resample_subjects(model.tokenizer, prompts, subjects, seed=seed, padding_side="left")
    if "ap" in need:
        scores["ap_scores"] = attribution.attribution_patching(model.params, model.cfg, pairs.clean, pairs.corrupt,
                                                               pairs.mask, (answer, others)).scores
    if "ct" in need:
        scores["ct_scores"] = causal_tracing.trace_components(model.params, model.cfg, pairs.clean, pairs.mask,
                                                              pairs.subject, answer, jax.random.key(seed),
                                                              samples=ct_samples).nie
    return {k: v if k == "flu_layers" else jax.tree.map(np.asarray, v) for k, v in scores.items()}


def build_localization(model, name: str, scores: Mapping | Localization, seed: int = 0,
                       rule: str = "fill") -> Localization:
    """The named localization from `localization_scores` output (or a ready Localization)."""
    if name not in components.PAPER_LOCALIZATIONS:
        raise JaxeditError(f"unknown localization {name!r}: use one of {', '.join(components.PAPER_LOCALIZATIONS)}")
    if isinstance(scores, Localization):
        return scores
    locs = components.paper_localizations(model.cfg, scores["flu_layers"], ap_scores=scores.get("ap_scores"),
                                          ct_scores=scores.get("ct_scores"), seed=seed, rule=rule)
    if name not in locs:
        raise JaxeditError(f"localization {name!r} needs {'ap_scores' if 'ap' in name else 'ct_scores'}, "
                           f"which the scores lack (keys {sorted(scores)})")
    return locs[name]


def _batches(model, task, forget: list, split, settings: Settings, general: Callable | None):
    sets = task.train_sets(model.tokenizer, dataclasses.replace(split, forget=forget))
    prompts = PromptBatches(model.tokenizer, sets, settings.batch_size, settings.steps * settings.hparams.accumulate,
                            settings.seed)
    return prompts if general is None else (lambda i: prompts(i) | {"lm": general(i)})


def edit(model, task, split, masks: list, settings: Settings, general: Callable | None = None,
         checkpoint_dir: str | Path | None = None) -> dict:
    """Edited params: one training run per partition (one mask each; one partition = the whole forget set).

    Sequential editing (§4.5) trains partition p from partition p-1's params with a fresh optimizer
    and schedule; previously edited partitions are not replayed.
    """
    partitions = split.partitions or (split.forget,)
    if len(masks) != len(partitions):
        raise JaxeditError(f"{len(partitions)} partitions need {len(partitions)} masks, got {len(masks)}")
    params = model.params
    for p, (facts, mask) in enumerate(zip(partitions, masks)):
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"partition{p}"
        params = train(model, mask, _batches(model, task, list(facts), split, settings, general), settings.steps,
                       settings.hparams, init_params=params, checkpoint_dir=ckpt,
                       checkpoint_every=settings.checkpoint_every)
    return params


def selection_score(metrics: Mapping, keys, general_accuracy: float | None) -> float:
    """§4.4 (higher is better): general-text accuracy + (1 − forget) + maintain + edit."""
    forget, maintain, edit_acc = (metrics[f"after/{k}"] for k in keys)
    return (general_accuracy or 0.0) + (1 - forget) + maintain + edit_acc


def evaluate(model, task, split, params, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in task.evaluate(model, split.forget_test, split.maintain_test, params).items()}


def side_effects(model, params, general_text, settings: Settings, prefix: str) -> dict:
    from jaxedit.eval.side_effects import evaluate_mmlu, general_text_metrics

    out = {}
    if general_text is not None:
        tokens, mask = general_text
        reference = None if params is model.params else model.params
        out |= {f"{prefix}/general/{k}": v for k, v in
                general_text_metrics(model, tokens, mask, params=params, reference_params=reference).items()}
    if settings.mmlu_dir:
        result = evaluate_mmlu(model, settings.mmlu_dir, params=params, limit=settings.mmlu_limit)
        out[f"{prefix}/mmlu"] = result["accuracy"]
    return out


def attacks(model, task, split, params, settings: Settings) -> dict:
    """Relearning and soft-prompt attacks on the edited `params` (train on one half of the forget set)."""
    out = {}
    train_half, held_out = split_forget(split.forget_test)
    if settings.relearn is not None:
        sets = task.relearn_sets(model.tokenizer, train_half, split.maintain_train)
        out |= relearn(model, params, sets, lambda p: task.relearn_evaluate(model, held_out, split.maintain_test, p),
                       settings.relearn)
        last = max(s for s in settings.relearn.eval_at if s <= settings.relearn.steps)
        out |= {"relearn_forget": out[f"relearn/{last}/fact/forget"],
                "relearn_maintain": out[f"relearn/{last}/fact/maintain"]}
    if settings.soft_prompt is not None:
        from jaxedit.attacks.soft_prompt import train_adversary

        prompts, labels = task.soft_prompt_data(train_half)
        adversary = train_adversary(model, params, prompts, labels, settings.soft_prompt)  # restarts in parallel
        metrics = task.soft_prompt_metrics(model, params, adversary, held_out, split.maintain_test)
        out |= {f"softprompt_{k}": float(np.mean(v)) for k, v in metrics.items()}  # mean over restarts (§5.7)
    return out


def run_experiment(model, task, split, localization: str, settings: Settings = Settings(), *,
                   scores: Mapping | Localization | list | None = None, general: Callable | None = None,
                   general_text: tuple | None = None, before: dict | None = None,
                   checkpoint_dir: str | Path | None = None, rule: str = "fill") -> dict:
    """The whole experiment of the module doc; returns a flat dict of metrics and timings.

    scores: `localization_scores` output (a list of them for sequential partitions), a Localization,
    or None (computed here). general: callable i -> {'tokens','mask'} general-text micro-batches for
    the LM/KL terms; general_text: (tokens [N,T], mask [N,T]) for side-effect metrics; before: the
    before-edit metrics if already measured (they do not depend on the localization).
    """
    times, out = {}, {}
    clock = time.perf_counter()

    def lap(stage):
        nonlocal clock
        now = time.perf_counter()
        times[f"time/{stage}"] = now - clock
        clock = now

    partitions = split.partitions or (split.forget,)
    if scores is None:
        scores = [localization_scores(model, task, list(facts), (localization,), seed=settings.seed)
                  for facts in partitions]
    elif not isinstance(scores, list):
        scores = [scores]
    locs = [build_localization(model, localization, s, settings.seed, rule) for s in scores]
    lap("localize")
    if before is None:
        before = evaluate(model, task, split, None, "before") | side_effects(model, model.params, general_text,
                                                                              settings, "before")
    out |= before
    lap("eval_before")
    edited = edit(model, task, split, [loc.mask for loc in locs], settings, general, checkpoint_dir)
    lap("edit")
    out |= evaluate(model, task, split, edited, "after") | side_effects(model, edited, general_text, settings, "after")
    lap("eval_after")
    if settings.probe_steps:
        out |= task.latent(model, split, edited, settings.probe_steps, settings.seed)
        lap("probe")
    out |= attacks(model, task, split, edited, settings)
    lap("attacks")
    out |= {col: out[key] for col, key in task.columns.items() if key in out}
    out["selection_score"] = selection_score(out, task.selection, out.get("after/general/accuracy"))
    out |= {"localization": localization, "n_params": int(sum(loc.n_params for loc in locs)),
            "components": [loc.components.labels() for loc in locs], **split.sizes()}
    times["time/total"] = sum(times.values())
    return out | times
