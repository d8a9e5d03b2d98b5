"""Load time and plain-forward throughput of a model on this machine.

    python -m benchmarks.forward [--model gemma-3-270m] [--batch 8] [--length 32]

Prints a Markdown row and appends a JSON line to benchmarks/results/forward.jsonl. Compile time is
reported apart from the steady state (median of repeated timed calls).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxedit
from benchmarks.suite import timed
from jaxedit.models import core

RESULTS = Path(__file__).parent / "results" / "forward.jsonl"


def measure(name: str, batch: int, length: int, repeats: int, dtype: str) -> dict:
    start = time.perf_counter()
    model = jaxedit.load(name, dtype=dtype)
    load_s = time.perf_counter() - start
    cfg = model.cfg
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (batch, length)), jnp.int32)
    mask = jnp.ones_like(tokens)
    last = core.last_positions(mask)

    def run(params, tokens, full_logits):
        positions = None if full_logits else last
        return core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=positions)[0]

    row = {"model": name, "dtype": dtype, "batch": batch, "length": length, "load_s": round(load_s, 2),
           "device": jax.devices()[0].device_kind, "cpu": platform.processor() or platform.machine(),
           "jax": jax.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for label, full in (("last_logits", False), ("all_logits", True)):
        fn = jax.jit(run, static_argnums=2)
        first, steady = timed(fn, model.params, tokens, full, repeats=repeats)
        row[f"{label}_compile_s"] = round(first - steady, 2)
        row[f"{label}_tokens_per_s"] = round(batch * length / steady, 1)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    row = measure(args.model, args.batch, args.length, args.repeats, args.dtype)
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
