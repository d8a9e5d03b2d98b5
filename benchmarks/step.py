"""The default sweep's edit step, steady: `python -m benchmarks.step [LOCALIZATION ...] [--repeats N]`.

Prepares seed 0 of `configs/default.yaml` (Gemma-3-270M; the preparation is kept in
~/.cache/jaxedit/bench/step and read back by later runs), then times `edit.train.train_step` on the
unit's first micro-batch (forget + maintain prompts after their shared head, the general-text
window), with the unit's mask, trained rows, frozen prefix, lr and loss weights, exactly as
`jaxedit.edit.train.train` calls it: the first call (compilation, or a warm persistent cache) and the
median of N steady calls. Prints one line per localization with the load average and the dense
matmul roof measured in the same run, and appends them to benchmarks/results/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

import jaxedit
from benchmarks import suite
from jaxedit import experiment
from jaxedit.compilation import use_persistent_cache
from jaxedit.edit.optim import AdamWSpec
from jaxedit.edit.train import split_for_training, train_step
from jaxedit.localize import components
from jaxedit.models.registry import cache_dir
from jaxedit.sweep import runner
from jaxedit.sweep.config import load_config
from jaxedit.sweep.store import RunStore
from jaxedit.sweep.units import expand


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("localizations", nargs="*", default=["manual_interp", "localized_ap", "nonlocalized"])
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args(argv)
    use_persistent_cache(cache_dir() / "xla")
    out = cache_dir() / "bench" / "step"
    config = load_config(None, [f"output={out}", "seeds=[0]"])
    units = {u.localization: u for u in expand(config)}
    unknown = sorted(set(args.localizations) - set(units))
    if unknown:
        print(f"error: unknown localization {', '.join(unknown)}: use some of {', '.join(units)}", file=sys.stderr)
        return 2
    model = jaxedit.load(units[args.localizations[0]].model)
    store = RunStore(out / config.name)
    store.root.mkdir(parents=True, exist_ok=True)
    task, prepared = runner.prepare(config, model, units[args.localizations[0]], store)
    roof = suite.matmul_gflops()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for name in args.localizations:
        settings = runner.unit_settings(config, units[name])
        mask = experiment.build_localization(model, name, prepared.scores[0], seed=0).mask
        trainable, frozen, tmask = split_for_training(model.params, mask, model.cfg.n_layers)
        batch = experiment.edit_batches(model, task, list(prepared.split.forget), prepared, settings, seed=0)(0)
        t = settings.train
        optimizer = AdamWSpec(t.steps, t.warmup, t.weight_decay, t.clip_norm, t.accumulate)
        state = {"trainable": jax.tree.map(jax.numpy.copy, trainable)}  # train_step donates it
        state["opt"] = optimizer.init(state["trainable"])
        weights = t.loss_weights()
        frozen_below = components.frozen_prefix(mask, model.cfg.n_layers)

        def step():
            state["trainable"], state["opt"], metrics = train_step(
                state["trainable"], frozen, state["opt"], batch, model.cfg, weights, optimizer, tmask, t.lr,
                remat=t.remat, frozen_below=frozen_below)
            return metrics

        first, steady = suite.timed(step, repeats=args.repeats)
        load = round(os.getloadavg()[0], 2)
        shapes = {k: list(v["tokens"].shape) for k, v in batch.items()}
        print(f"{name}: first call {first:.2f} s, steady {steady:.3f} s (median of {args.repeats}); batch {shapes}; "
              f"load average {load}; matmul roof {roof:.0f} GFLOP/s", flush=True)
        with (suite.HERE / "results" / "results.jsonl").open("a") as f:
            f.write(json.dumps({"time": stamp, **suite.machine(), "path": "sweep edit step", "model": units[name].model,
                                "localization": name, "batch": shapes, "compile_s": round(first, 2),
                                "steady_s": round(steady, 4), "repeats": args.repeats, "loadavg": load,
                                "matmul_gflops": round(roof, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
