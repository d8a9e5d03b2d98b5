"""Run a sweep: prepare once per (model, seed), run every unit not yet written, then report.

Preparation (split, localization scores, before-edit metrics) is shared by a preparation's units
and saved under prep/ so a restarted sweep does not redo it. Each process of a multi-host run
takes its own units (`sharding.process_units`) and checkpoints their training; process 0 writes
results.jsonl and the report once every process is done. A run stopped by any exception (an
interrupt too) keeps what it computed; only a new single-process run that computed nothing
removes its directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import jax
from tqdm import tqdm

import jaxedit
from jaxedit import experiment
from jaxedit.data import text
from jaxedit.errors import JaxeditError
from jaxedit.io import say
from jaxedit.models import registry
from jaxedit.sweep import parallel, report
from jaxedit.sweep.config import SweepConfig
from jaxedit.sweep.store import RunStore, write_json
from jaxedit.sweep.units import Unit, expand
from jaxedit.tasks import Task, make_task


def unit_settings(config: SweepConfig, unit: Unit) -> SweepConfig:
    """The config one unit runs with: its grid point applied, then the preset for its model and localization."""
    cfg = unit.config(config)
    return dataclasses.replace(cfg, train=cfg.train.for_localization(unit.model, unit.localization))


def prepare(config: SweepConfig, model, unit: Unit, store: RunStore) -> tuple[Task, experiment.Prepared]:
    """The unit's task and preparation: read from prep/ when an earlier run computed it, else computed and saved."""
    cfg = unit.config(config)
    task = make_task(cfg.task, cfg.data, cfg.eval)
    split = task.split(model, cfg.data, seed=unit.seed)
    path = store.prep_path(unit.prep_id)
    if path.is_file():
        general = text.general_text(model, cfg.general_text, unit.seed)
        return task, experiment.Prepared.from_json(json.loads(path.read_text()), split, general)
    say(f"{unit.prep_id}: {len(split.forget)} forget facts, {split.n_known} of {split.n_candidates} known; "
        f"localizing ({', '.join(cfg.localizations)})")
    prepared = experiment.prepare(model, task, split, cfg, cfg.localizations, unit.seed, on_scores=lambda scores: say(
        f"{unit.prep_id}: FLU layers {[list(s['flu_layers']) for s in scores]}; evaluating before editing"))
    write_json(path, prepared.to_json())
    report.save_score_plots(store.root / "report" / "scores" / unit.prep_id, prepared.scores[0], model.cfg)
    return task, prepared


def _run_model_units(config: SweepConfig, store: RunStore, model, units: list[Unit], bar: tqdm) -> None:
    """Run `units` (all of one model), `config.parallel_units` at a time in threads that share the model and the
    preparations (each prepared once, by the first unit that needs it). A unit computes the same numbers alone or
    beside another; on 2 CPU cores two at a time keep both cores busier through each unit's small operations."""
    preps, preparing = {}, threading.Lock()

    def run(unit: Unit) -> None:
        bar.set_postfix_str(unit.id)
        with preparing:
            if unit.prep_id not in preps:
                preps[unit.prep_id] = prepare(config, model, unit, store)
        row = run_unit(config, unit, model, *preps[unit.prep_id], store)
        store.write_unit(unit.id, row)
        shutil.rmtree(store.checkpoint_dir(unit.id), ignore_errors=True)
        say(f"{unit.id}: " + ", ".join(f"{k} {row[k]:.3f}" for k in report.headline(row)) +
            f" ({row['time/total']:.0f} s)")
        bar.update(1)

    pool = ThreadPoolExecutor(config.parallel_units, thread_name_prefix="unit")
    try:
        for done in as_completed([pool.submit(run, unit) for unit in units]):
            done.result()  # the first failure (or an interrupt of this thread) ends the sweep
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # an interrupt leaves without waiting for the unit in flight


def run_unit(config: SweepConfig, unit: Unit, model, task: Task, prepared: experiment.Prepared,
             store: RunStore) -> dict:
    cfg = unit_settings(config, unit)
    row = experiment.run_experiment(
        model, task, prepared, unit.localization, cfg, seed=unit.seed,
        checkpoint_dir=store.checkpoint_dir(unit.id))
    return unit.labels() | {"lr": cfg.train.lr, "forget_loss_coef": cfg.train.forget_loss_coef,
                            "task": config.task} | row


def devices_info() -> dict:
    return {"backend": jax.default_backend(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "kind": jax.devices()[0].device_kind}


def run_sweep(config: SweepConfig, resume_anyway: bool = False) -> Path:
    """Run (or resume) `config`; returns the run directory. Only process 0 writes the report.

    resume_anyway: continue a run directory made by other code (`RunStore.open`).
    """
    parallel.initialize()
    store = RunStore(Path(config.output) / config.name)
    units = expand(config)
    mine = parallel.process_units(units)
    for name in config.models:  # fail before writing anything: a missing model or package, a bad data file
        registry.resolve(name)
    make_task(config.task, config.data, config.eval)
    parallel.check_mesh(config.mesh)
    resumed = store.open(config.to_dict(), devices_info(), resume_anyway)
    try:
        _run_units(config, store, units, mine, resumed)
    except BaseException:
        if not resumed and jax.process_count() == 1 and not store.has_results():
            shutil.rmtree(store.root, ignore_errors=True)  # nothing computed: leave no empty run behind
        raise
    return store.root


def _run_units(config: SweepConfig, store: RunStore, units: list[Unit], mine: list[Unit], resumed: bool) -> None:
    todo = [u for u in mine if not store.done(u.id)]
    for unit in mine:  # a kill between writing a unit and removing its checkpoints left them behind
        if store.done(unit.id):
            shutil.rmtree(store.checkpoint_dir(unit.id), ignore_errors=True)
    say(f"{'resuming' if resumed else 'starting'} {store.root}: {len(units)} units, {len(mine)} on this process, "
        f"{len(mine) - len(todo)} already done")
    started = time.perf_counter()
    with tqdm(total=len(todo), desc="units", file=sys.stderr, disable=not todo) as bar:  # closed however it ends
        for name, group in itertools.groupby(todo, key=lambda u: u.model):  # one model in memory at a time
            say(f"loading {name}")
            _run_model_units(config, store, parallel.place_model(jaxedit.load(name, dtype=config.dtype), config.mesh),
                             list(group), bar)
    parallel.barrier("jaxedit-sweep-done")
    if jax.process_index() == 0:
        missing = [u.id for u in units if not store.done(u.id)]
        if missing:
            raise JaxeditError(f"{len(missing)} units have no result (e.g. {missing[0]}): run the sweep again")
        store.write_results()
        store.update_manifest(seconds_last_run=time.perf_counter() - started, finished=time.strftime("%F %T"))
        report.write_report(store, config)
