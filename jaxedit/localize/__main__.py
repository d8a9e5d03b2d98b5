"""`python -m jaxedit.localize`: every localization of the paper on a model and a task's known facts."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import jaxedit
from jaxedit.errors import JaxeditError
from jaxedit.io import say
from jaxedit.localize import components, pipeline
from jaxedit.localize.pipeline import LocalizeSettings
from jaxedit.tasks import TASKS, DataSettings, EvalSettings, make_task


def localize_task(model, task, data: DataSettings, out_dir: Path, probes: bool, settings: LocalizeSettings,
                  seed: int, model_name: str) -> dict:
    """Localize the task's first `data.n_forget` known facts (probes on its maintain facts too); write out_dir."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    split = task.split(model, data, seed=seed)
    say(f"{split.n_known}/{split.n_candidates} facts known; patching {len(split.forget)}")
    inputs = task.localization_inputs(model, split.forget)
    extra = task.localization_inputs(model, split.maintain_train + split.maintain_test)
    localized = pipeline.localize(model, inputs, components.PAPER_LOCALIZATIONS, settings, seed,
                                  probe_inputs=extra if probes and extra.labels is not None else None)
    say(f"fact lookup: receiver layer {localized.flu.receiver}, selected MLP layers {list(localized.flu_layers)}; "
        f"attribution patching and causal tracing done")
    effect, rho = pipeline.mlp_patching_check(model, inputs, localized, seed)
    say(f"activation patching of MLP outputs (noising): Spearman ρ with AtP mlp_out = {rho:.3f}")
    scores = localized.scores()
    locs = components.paper_localizations(model.cfg, localized.flu_layers, ap_scores=scores["ap_scores"],
                                          ct_scores=scores["ct_scores"], seed=seed, rule=settings.rule)
    say("localizations: " + ", ".join(f"{k} {v.n_params / 1e6:.1f}M" for k, v in locs.items()))
    facts = {"model": model_name, "task": task.name, "seed": seed, "settings": dataclasses.asdict(settings),
             "facts": split.n_candidates, "known": split.n_known, "patched": inputs.subjects,
             "seconds": round(time.perf_counter() - start, 1)}
    summary = pipeline.summary(localized, locs, rho, facts)
    pipeline.write_artifacts(out_dir, localized, locs, inputs, summary, effect, model_name)
    say(f"wrote {out_dir}/summary.md")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxedit.localize", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="registry name, HF directory or .gguf file")
    parser.add_argument("--task", default="sports_athletes", choices=sorted(TASKS), help="whose facts")
    parser.add_argument("--facts", default=None, help="the task's data file (default: its built-in facts)")
    parser.add_argument("--out", default=time.strftime("runs/localize-%Y%m%d-%H%M%S"),
                        help="output directory (must not exist yet; default: a new one under runs/)")
    parser.add_argument("--n-facts", type=int, default=24, help="known facts to localize (patch and trace)")
    parser.add_argument("--n-probe", type=int, default=300,
                        help="more known facts the fact-lookup probes train on (tasks with classes; 0: none)")
    parser.add_argument("--ct-samples", type=int, default=LocalizeSettings.ct_samples, help="noise samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists():
            raise JaxeditError(f"output directory {out} already exists: pass a new --out or remove it")
        data = DataSettings(path=args.facts, n_forget=args.n_facts, max_maintain=max(args.n_probe, 5))
        task = make_task(args.task, data, EvalSettings())  # cheap checks of the facts before the model loads
        model = jaxedit.load(args.model)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # a previous run killed midway
        localize_task(model, task, data, partial, args.n_probe > 0, LocalizeSettings(ct_samples=args.ct_samples),
                      args.seed, args.model)
    except JaxeditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    partial.rename(out)
    print(f"done: {out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
