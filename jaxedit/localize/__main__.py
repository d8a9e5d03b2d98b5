"""`python -m jaxedit.localize`: every localization of the paper on a model and the built-in sports facts."""

from __future__ import annotations

import argparse
import shutil
import time
import sys
from pathlib import Path

import jaxedit
from jaxedit.data.sports import load_sports
from jaxedit.errors import JaxeditError
from jaxedit.localize.pipeline import LocalizeSettings, localize_sports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxedit.localize", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="registry name, HF directory or .gguf file")
    parser.add_argument("--facts", default=None, help="sports CSV (built-in or the paper's sports.csv schema)")
    parser.add_argument("--out", default=time.strftime("runs/localize-%Y%m%d-%H%M%S"),
                        help="output directory (must not exist yet; default: a new one under runs/)")
    parser.add_argument("--n-facts", type=int, default=LocalizeSettings.n_facts, help="known facts to patch and trace")
    parser.add_argument("--n-probe", type=int, default=LocalizeSettings.n_probe, help="facts to train probes on")
    parser.add_argument("--ct-samples", type=int, default=LocalizeSettings.ct_samples, help="noise samples")
    parser.add_argument("--seed", type=int, default=LocalizeSettings.seed)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists():
            raise JaxeditError(f"output directory {out} already exists: pass a new --out or remove it")
        facts = load_sports(args.facts)  # cheap checks before the model loads
        model = jaxedit.load(args.model)
        settings = LocalizeSettings(n_facts=args.n_facts, n_probe=args.n_probe, seed=args.seed,
                                    ct_samples=args.ct_samples)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # a previous run killed midway
        localize_sports(model, partial, settings, model_name=args.model, facts=facts)
    except JaxeditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    partial.rename(out)
    print(f"done: {out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
