"""One experiment of the paper (method.md §4–§6): localize → edit → evaluate → attack, for any task.

`prepare(model, task, split, settings)` computes what every localization of one (model, facts,
seed) shares: localization scores on the forget facts (`localize.pipeline`; one set per
sequential partition), the before-edit metrics and the general text. Then
`run_experiment(model, task, prepared, 'manual_interp', settings)`:
1. localization: the named one of `components.paper_localizations`, built from the scores;
2. edit: train only the mask, L = forget_coef · CE(injected) + maintain CE + general-text LM CE
   (+ optional KL to the original) (§4.2); sequential editing (§4.5) when `split.partitions`;
3. evaluate after the edit in every format of the task, latent probes (§5.6), side effects on
   general text (CE, next-token accuracy, KL to the original) and MMLU if given;
4. attacks on the edited params: relearning (§5.8) and soft prompts (§5.7).
The returned dict holds every metric under 'before/…' and 'after/…', the §6 columns under short
names, the §4.4 selection score, and wall-clock seconds per stage under 'time/…'. `Settings` is
the tree of every knob (the sweep config's sections are its fields).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxedit.attacks.relearn import RelearnSettings, relearn
from jaxedit.attacks.soft_prompt import SoftPromptSettings, train_adversary
from jaxedit.data import text
from jaxedit.data.batching import PromptBatches
from jaxedit.data.text import GeneralTextSettings
from jaxedit.edit.train import TrainSettings, train
from jaxedit.errors import JaxeditError
from jaxedit.localize import components, pipeline
from jaxedit.localize.components import Localization
from jaxedit.localize.pipeline import LocalizeSettings
from jaxedit.tasks.base import DataSettings, EvalSettings, Task
from jaxedit.tasks.split import Split


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of an experiment, one section per stage (each a library settings class)."""

    data: DataSettings = DataSettings()
    localize: LocalizeSettings = LocalizeSettings()
    train: TrainSettings = TrainSettings()
    general_text: GeneralTextSettings = GeneralTextSettings()
    eval: EvalSettings = EvalSettings()
    relearn: RelearnSettings = RelearnSettings()
    soft_prompt: SoftPromptSettings = SoftPromptSettings()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What the localizations of one (model, split, seed) share (`prepare`).

    scores: per partition (one unless sequential), `Localized.scores()`: 'flu_layers' and the
    'ap_scores' / 'ct_scores' site arrays the localizations need; before: the before-edit metrics;
    general_text: `text.GeneralText` (disjoint training and held-out windows) or None.
    """

    split: Split
    scores: list[dict]
    before: dict
    general_text: tuple | None

    def to_json(self) -> dict:
        """scores and before as JSON values (the split and text are rebuilt, deterministically)."""
        scores = [{k: v if k == "flu_layers" else {site: a.tolist() for site, a in v.items()} for k, v in s.items()}
                  for s in self.scores]
        return {"scores": scores, "before": self.before, "sizes": self.split.sizes()}

    @classmethod
    def from_json(cls, saved: dict, split: Split, general_text: tuple | None) -> Prepared:
        scores = [{k: tuple(v) if k == "flu_layers" else {site: np.asarray(a, np.float32) for site, a in v.items()}
                   for k, v in s.items()} for s in saved["scores"]]
        return cls(split, scores, saved["before"], general_text)


def prepare(model, task: Task, split: Split, settings: Settings = Settings(),
            localizations=components.PAPER_LOCALIZATIONS, seed: int = 0, on_scores=None) -> Prepared:
    """Scores for `localizations` on each partition's facts, before-edit metrics (probes included), general text.

    on_scores(scores): called once the scores exist (the sweep logs the FLU layers there).
    """
    partitions = split.partitions or (split.forget,)
    scores = [pipeline.localize(model, task.localization_inputs(model, list(facts)), localizations,
                                settings.localize, seed).scores() for facts in partitions]
    if on_scores is not None:
        on_scores(scores)
    general = text.general_text(model, settings.general_text, seed)
    before = evaluate(model, task, split, None, "before") | side_effects(model, model.params, general, settings.eval,
                                                                          "before")
    if settings.eval.probes:  # the probes' before-edit baseline: the same fit on the original params
        before |= {f"before/{k}": v for k, v in
                   task.latent(model, split, model.params, settings.eval.probe_steps, seed).items()}
    return Prepared(split, scores, before, general)


def build_localization(model, name: str, scores: Mapping, seed: int = 0, rule: str = "fill") -> Localization:
    """The named localization from one partition's `Prepared.scores`."""
    if name not in components.PAPER_LOCALIZATIONS:
        raise JaxeditError(f"unknown localization {name!r}: use one of {', '.join(components.PAPER_LOCALIZATIONS)}")
    locs = components.paper_localizations(model.cfg, scores["flu_layers"], ap_scores=scores.get("ap_scores"),
                                          ct_scores=scores.get("ct_scores"), seed=seed, rule=rule)
    if name not in locs:
        raise JaxeditError(f"localization {name!r} needs {'ap_scores' if 'ap' in name else 'ct_scores'}, "
                           f"which the scores lack (keys {sorted(scores)})")
    return locs[name]


def edit_batches(model, task: Task, forget: list, prepared: Prepared, settings: Settings, seed: int):
    """Micro-batch i of the edit: forget + maintain prompts (+ 'lm' general text when an LM/KL term is on)."""
    t = settings.train
    n_batches = t.steps * t.accumulate
    sets = task.train_sets(model.tokenizer, dataclasses.replace(prepared.split, forget=forget))
    prompts = PromptBatches(model.tokenizer, sets, t.batch_size, n_batches, seed)
    if prepared.general_text is None or not (t.lm_coef or t.kl_coef):
        return prompts
    tokens, mask = prepared.general_text.train
    general = text.lm_batches(tokens, mask, settings.general_text.batch_size or t.batch_size, n_batches, seed)
    return lambda i: prompts(i) | {"lm": general(i)}


def edit(model, task: Task, prepared: Prepared, masks: list, settings: Settings, seed: int = 0,
         checkpoint_dir: str | Path | None = None) -> dict:
    """Edited params: one training run per partition (one mask each; one partition = the whole forget set).

    Sequential editing (§4.5) trains partition p from partition p-1's params with a fresh optimizer
    and schedule; previously edited partitions are not replayed.
    """
    partitions = prepared.split.partitions or (prepared.split.forget,)
    if len(masks) != len(partitions):
        raise JaxeditError(f"{len(partitions)} partitions need {len(partitions)} masks, got {len(masks)}")
    params = model.params
    for p, (facts, mask) in enumerate(zip(partitions, masks)):
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"partition{p}"
        params = train(model, mask, edit_batches(model, task, list(facts), prepared, settings, seed), settings.train,
                       seed=seed, progress=False, init_params=params, checkpoint_dir=ckpt)
    return params


def selection_score(metrics: Mapping, keys, general_accuracy: float | None) -> float:
    """§4.4 (higher is better): general-text accuracy + (1 − forget) + maintain + edit."""
    forget, maintain, edit_acc = (metrics[f"after/{k}"] for k in keys)
    return (general_accuracy or 0.0) + (1 - forget) + maintain + edit_acc


def evaluate(model, task: Task, split: Split, params, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in task.evaluate(model, split.forget_test, split.maintain_test, params).items()}


def side_effects(model, params, general_text, settings: EvalSettings, prefix: str) -> dict:
    """General-text CE / accuracy / KL to the original model on the held-out windows (`text.GeneralText`), and
    MMLU when `settings.mmlu_dir` is set."""
    from jaxedit.eval.side_effects import evaluate_mmlu, general_text_metrics

    out = {}
    if general_text is not None:
        tokens, mask = general_text.held_out
        reference = None if params is model.params else model.params
        out |= {f"{prefix}/general/{k}": v for k, v in
                general_text_metrics(model, tokens, mask, params=params, reference_params=reference).items()}
    if settings.mmlu_dir:
        result = evaluate_mmlu(model, settings.mmlu_dir, params=params, limit=settings.mmlu_limit)
        out[f"{prefix}/mmlu"] = result["accuracy"]
    return out


def attacks(model, task: Task, split: Split, params, settings: Settings, seed: int = 0) -> dict:
    """Relearning and soft-prompt attacks on the edited `params` (train on one half of the forget set, §5.8)."""
    out = {}
    train_half, held_out = split.relearn_halves()
    if settings.relearn.enabled:
        sets = task.relearn_sets(model.tokenizer, train_half, split.maintain_train)
        out |= relearn(model, params, sets, lambda p: task.relearn_evaluate(model, held_out, split.maintain_test, p),
                       settings.relearn, seed)
        last = settings.relearn.steps  # eval_at ends there (`RelearnSettings`)
        out |= {"relearn_forget": out[f"relearn/{last}/fact/forget"],
                "relearn_maintain": out[f"relearn/{last}/fact/maintain"]}
    if settings.soft_prompt.enabled:
        prompts, labels = task.soft_prompt_data(train_half)
        adversary = train_adversary(model, params, prompts, labels, settings.soft_prompt, seed)  # restarts in parallel
        metrics = task.soft_prompt_metrics(model, params, adversary, held_out, split.maintain_test)
        out |= {f"softprompt_{k}": float(np.mean(v)) for k, v in metrics.items()}  # mean over restarts (§5.7)
    return out


def run_experiment(model, task: Task, prepared: Prepared, localization: str, settings: Settings = Settings(), *,
                   seed: int = 0, checkpoint_dir: str | Path | None = None) -> dict:
    """The whole experiment of the module doc on `prepare`'s output; a flat dict of metrics and timings.

    settings.train must have its preset resolved (`TrainSettings.for_localization`). checkpoint_dir:
    in-flight training is checkpointed there and resumed from it.
    """
    times, out = {}, dict(prepared.before)
    clock = time.perf_counter()

    def lap(stage):
        nonlocal clock
        now = time.perf_counter()
        times[f"time/{stage}"] = now - clock
        clock = now

    split = prepared.split
    locs = [build_localization(model, localization, s, seed, settings.localize.rule) for s in prepared.scores]
    lap("localize")
    edited = edit(model, task, prepared, [loc.mask for loc in locs], settings, seed, checkpoint_dir)
    lap("edit")
    out |= evaluate(model, task, split, edited, "after") | side_effects(model, edited, prepared.general_text,
                                                                        settings.eval, "after")
    lap("eval_after")
    if settings.eval.probes:
        out |= task.latent(model, split, edited, settings.eval.probe_steps, seed)
        lap("probe")
    out |= attacks(model, task, split, edited, settings, seed)
    lap("attacks")
    out |= {col: out[key] for col, key in task.columns.items() if key in out}
    out["selection_score"] = selection_score(out, task.selection, out.get("after/general/accuracy"))
    out |= {"localization": localization, "n_params": int(sum(loc.n_params for loc in locs)),
            "components": [loc.components.labels() for loc in locs], **split.sizes()}
    times["time/total"] = sum(times.values())
    return out | times
