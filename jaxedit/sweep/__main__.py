"""`python -m jaxedit.sweep [CONFIG] [key=value ...]`: run (or resume) a sweep and write its report.

Ctrl-C (SIGINT) or SIGTERM pauses it: the run directory keeps what was computed, one line says so,
and the exit status is 128 + the signal (130, 143); the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

import yaml

from jaxedit.errors import JaxeditError
from jaxedit.sweep.config import SweepConfig, load_config, named_configs
from jaxedit.sweep.interrupts import Interrupted, raised_on_signals


def keys(cls=SweepConfig, prefix: str = "") -> dict[str, object]:
    """Every config key (dotted) with its default, from the settings dataclasses themselves."""
    out = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            out |= keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            out[prefix + field.name] = field.default
    return out


def _epilog() -> str:
    configs = ", ".join(named_configs())
    width = max(map(len, keys()))
    listed = "\n  ".join(f"{key:<{width}}  {_yaml(default)}" for key, default in keys().items())
    return (f"configs (in configs/): {configs}\n\nkeys and their defaults (override any with key=value, e.g. "
            f"train.steps=20 seeds=[0,1,2]):\n  {listed}\n\nA sweep writes <output>/<name>/ and resumes there when "
            "run again (after Ctrl-C, SIGTERM or a kill): finished units are kept, the unit in flight resumes from "
            "its last training checkpoint.")


def _yaml(value) -> str:
    """A default as it would be written in YAML (null, true, [0, 1])."""
    return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True, width=2**20).strip() \
        .removesuffix("...").strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxedit.sweep", description=__doc__.splitlines()[0],
                                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="a YAML file or the name of a config in configs/ (default: 'default')")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (values are YAML)")
    parser.add_argument("--dry-run", action="store_true", help="print the units and exit")
    parser.add_argument("--plan", action="store_true", help="print per-device memory of each model under the mesh "
                        "(shapes only, no weights) and exit")
    parser.add_argument("--devices", type=int, default=None, help="number of devices to plan for (with --plan)")
    parser.add_argument("--resume-anyway", action="store_true", help="continue a run directory made by another "
                        "code revision or package set (refused otherwise); the manifest records it")
    args = parser.parse_args(argv)
    try:
        with raised_on_signals():
            return _run(args)
    except Interrupted as stop:
        print("interrupted: run the same command to resume", file=sys.stderr)
        return stop.status


def _run(args) -> int:
    config_arg, overrides = args.config, list(args.overrides)
    if config_arg is not None and "=" in config_arg:
        config_arg, overrides = None, [config_arg] + overrides
    try:
        config = load_config(config_arg, overrides)
        if args.plan:
            from jaxedit.sweep.plan import plan

            print(plan(config, args.devices))
            return 0
        if args.dry_run:
            from jaxedit.sweep.units import expand

            for unit in expand(config):
                print(unit.id)
            return 0
        from jaxedit.compilation import use_persistent_cache
        from jaxedit.models.registry import cache_dir
        from jaxedit.sweep.runner import run_sweep

        use_persistent_cache(cache_dir() / "xla")  # a second run of a sweep compiles nothing
        root = run_sweep(config, args.resume_anyway)
    except JaxeditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done: report in {root}/report/summary.md")
    return 0


if __name__ == "__main__":
    status = main()
    if status > 128:  # interrupted: leave without tearing down JAX mid-computation (it can crash there)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
