"""Run a sweep: prepare once per (model, seed), run every unit not yet written, then report.

Preparation (split, localization scores, before-edit metrics) is shared by a preparation's units
and saved under prep/ so a restarted sweep does not redo it. Each process of a multi-host run
takes its own units (`sharding.process_units`); process 0 writes results.jsonl and the report
once every process is done.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import jaxedit
from jaxedit import experiment
from jaxedit.attacks.relearn import RelearnSettings
from jaxedit.edit.train import HParams, paper_model, preset
from jaxedit.errors import JaxeditError
from jaxedit.models import registry
from jaxedit.sweep import parallel, report
from jaxedit.sweep.config import SweepConfig
from jaxedit.sweep.store import RunStore, write_json
from jaxedit.sweep.units import Unit, expand
from jaxedit.tasks.factory import make_task


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def settings_for(config: SweepConfig, unit: Unit) -> experiment.Settings:
    """The experiment settings of one unit (grid point and paper preset applied)."""
    t = config.train
    lr, coef = t.lr, t.forget_loss_coef
    if t.preset:
        chosen = preset(t.preset, t.preset_model or paper_model(unit.model), unit.localization)
        lr, coef = chosen["lr"], chosen["forget_loss_coef"]
    general = config.general_text
    hparams = HParams(lr=lr, forget_loss_coef=coef, maintain_coef=t.maintain_coef,
                      lm_coef=t.lm_coef if general.n else 0.0, kl_coef=t.kl_coef if general.n else 0.0,
                      unlearn=t.unlearn, accumulate=t.accumulate, clip_norm=t.clip_norm, dtype=t.dtype,
                      remat=t.remat, seed=unit.seed, progress=False)
    r = config.relearn
    relearn = RelearnSettings(lora_rank=r.lora_rank, lora_alpha=r.lora_alpha, lr=r.lr, steps=r.steps,
                              eval_at=r.eval_at, batch_size=r.batch_size, accumulate=r.accumulate,
                              seed=unit.seed) if r.enabled else None
    soft = None
    if config.soft_prompt.enabled:
        from jaxedit.attacks.soft_prompt import SoftPromptSettings

        s = config.soft_prompt
        soft = SoftPromptSettings(kind=s.kind, n_vectors=s.n_vectors, eps=s.eps, lr=s.lr, steps=s.steps,
                                  batch_size=s.batch_size, restarts=s.restarts, seed=unit.seed, progress=False)
    return experiment.Settings(hparams=hparams, steps=t.steps, batch_size=t.batch_size,
                               probe_steps=config.eval.probe_steps if config.eval.probes else 0,
                               relearn=relearn, soft_prompt=soft, mmlu_dir=config.eval.mmlu_dir,
                               mmlu_limit=config.eval.mmlu_limit, checkpoint_every=t.checkpoint_every,
                               seed=unit.seed)


class Preparation:
    """What a (model, seed) group of units shares; computed once and cached in the run directory."""

    def __init__(self, config: SweepConfig, model, unit: Unit, store: RunStore):
        cfg = unit.config(config)
        self.task = make_task(cfg)
        d = cfg.data
        self.split = self.task.split(model, d.n_forget, d.known_threshold, d.max_maintain, d.pool_size)
        self.general_text = self._general_text(cfg, model, unit.seed)
        self.lm_batch_size = cfg.general_text.batch_size
        path = store.prep_path(unit.prep_id)
        if path.is_file():
            cached = json.loads(path.read_text())
            self.scores = [_arrays(s) for s in cached["scores"]]
            self.before = cached["before"]
            return
        partitions = self.split.partitions or (self.split.forget,)
        say(f"{unit.prep_id}: {len(self.split.forget)} forget facts, {self.split.n_known} of "
            f"{self.split.n_candidates} known; localizing ({', '.join(cfg.localizations)})")
        self.scores = [experiment.localization_scores(model, self.task, list(facts), cfg.localizations,
                                                      seed=unit.seed, flu_layers=cfg.localize.flu_layers,
                                                      ct_samples=cfg.localize.ct_samples) for facts in partitions]
        say(f"{unit.prep_id}: FLU layers {[list(s['flu_layers']) for s in self.scores]}; evaluating before editing")
        settings = settings_for(config, unit)
        self.before = experiment.evaluate(model, self.task, self.split, None, "before") | experiment.side_effects(
            model, model.params, self.general_text, settings, "before")
        write_json(path, {"scores": self.scores, "before": self.before, "sizes": self.split.sizes()})
        report.save_score_plots(store.root / "report" / "scores" / unit.prep_id, self.scores[0], model.cfg)

    @staticmethod
    def _general_text(cfg: SweepConfig, model, seed: int):
        g = cfg.general_text
        if not g.n:
            return None
        from jaxedit.data import text

        if g.corpus:
            return text.load_corpus(g.corpus, model.tokenizer, g.n, ctx=g.ctx, seed=seed)
        return text.sample_text(model, g.n, ctx=g.ctx, seed=seed)

    def general_batches(self, settings: experiment.Settings):
        if self.general_text is None or not (settings.hparams.lm_coef or settings.hparams.kl_coef):
            return None
        from jaxedit.data import text

        tokens, mask = self.general_text
        return text.lm_batches(tokens, mask, self.lm_batch_size or settings.batch_size,
                               settings.steps * settings.hparams.accumulate, settings.seed)


def _arrays(tree):
    """JSON-loaded scores back to numpy arrays (FLU layers stay a tuple of ints)."""
    out = {"flu_layers": tuple(tree["flu_layers"])}
    for key in ("ap_scores", "ct_scores"):
        if key in tree:
            out[key] = {site: np.asarray(v, np.float32) for site, v in tree[key].items()}
    return out


def run_unit(config: SweepConfig, unit: Unit, model, prep: Preparation, store: RunStore) -> dict:
    settings = settings_for(config, unit)
    row = experiment.run_experiment(
        model, prep.task, prep.split, unit.localization, settings, scores=prep.scores,
        general=prep.general_batches(settings), general_text=prep.general_text, before=prep.before,
        checkpoint_dir=store.checkpoint_dir(unit.id) if jax.process_count() == 1 else None, rule=config.localize.rule)
    return unit.labels() | {"lr": settings.hparams.lr, "forget_loss_coef": settings.hparams.forget_loss_coef,
                            "task": config.task} | row


def devices_info() -> dict:
    return {"backend": jax.default_backend(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "kind": jax.devices()[0].device_kind}


def run_sweep(config: SweepConfig) -> Path:
    """Run (or resume) `config`; returns the run directory. Only process 0 writes the report."""
    parallel.initialize()
    store = RunStore(Path(config.output) / config.name)
    units = expand(config)
    mine = parallel.process_units(units)
    for name in config.models:  # fail before writing anything: a missing model or package, a bad data file
        registry.resolve(name)
    make_task(config)
    parallel.check_mesh(config.mesh)
    resumed = store.open(config.to_dict(), devices_info())
    try:
        _run_units(config, store, units, mine, resumed)
    except BaseException:
        if not resumed and not any((store.root / "units").glob("*.json")):
            shutil.rmtree(store.root, ignore_errors=True)  # nothing finished: leave no half-made run behind
        raise
    return store.root


def _run_units(config: SweepConfig, store: RunStore, units: list[Unit], mine: list[Unit], resumed: bool) -> None:
    todo = [u for u in mine if not store.done(u.id)]
    say(f"{'resuming' if resumed else 'starting'} {store.root}: {len(units)} units, {len(mine)} on this process, "
        f"{len(mine) - len(todo)} already done")
    started = time.perf_counter()
    models, preps = {}, {}
    bar = tqdm(todo, desc="units", file=sys.stderr, disable=not todo)
    for unit in bar:
        bar.set_postfix_str(unit.id)
        if unit.model not in models:
            models.clear()
            say(f"loading {unit.model}")
            models[unit.model] = parallel.place_model(jaxedit.load(unit.model), config.mesh)
        model = models[unit.model]
        if unit.prep_id not in preps:
            preps[unit.prep_id] = Preparation(config, model, unit, store)
        row = run_unit(config, unit, model, preps[unit.prep_id], store)
        store.write_unit(unit.id, row)
        shutil.rmtree(store.checkpoint_dir(unit.id), ignore_errors=True)
        say(f"{unit.id}: " + ", ".join(f"{k} {row[k]:.3f}" for k in report.headline(row)) +
            f" ({row['time/total']:.0f} s)")
    parallel.barrier("jaxedit-sweep-done")
    if jax.process_index() == 0:
        missing = [u.id for u in units if not store.done(u.id)]
        if missing:
            raise JaxeditError(f"{len(missing)} units have no result (e.g. {missing[0]}): run the sweep again")
        store.write_results()
        store.update_manifest(seconds_last_run=time.perf_counter() - started, finished=time.strftime("%F %T"))
        report.write_report(store, config)
