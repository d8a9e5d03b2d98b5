"""Run the benchmark suite: `python -m benchmarks [--quick] [--models a,b] [--peers tl,hf]`.

Prints a Markdown table and appends one JSON line per row (with the machine description) to
benchmarks/results/results.jsonl. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

import jaxedit  # noqa: E402
from benchmarks import suite  # noqa: E402
from jaxedit import sharding  # noqa: E402
from jaxedit.compilation import use_persistent_cache  # noqa: E402
from jaxedit.models.registry import cache_dir  # noqa: E402

RESULTS = suite.HERE / "results" / "results.jsonl"
COLUMNS = ("model", "path", "impl", "batch", "devices", "compile_s", "steady_s", "fwd_per_s", "tokens_per_s", "gflops", "frac_matmul",
           "peak_rss_mb", "matmul_gflops", "loadavg", "max_abs_diff", "jaxedit_over_peer", "vs_fwd_bwd", "flop_vs_full")
ALL_MODELS = (suite.GPT2, "smollm2-135m", "gemma-3-270m")


def table(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r.get("error", "") if c == "steady_s" and "error" in r else r.get(c) for c in COLUMNS]
        lines.append("| " + " | ".join("" if v is None else (f"{v:.2e}" if isinstance(v, float) and 0 < abs(v) < 1e-2
                                                            else str(v)) for v in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2-small random only, 2 prompts × 8 tokens, 8 peer sites")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated, of {', '.join(ALL_MODELS)}")
    parser.add_argument("--prompts", type=int, default=4, help="prompt pairs (batch)")
    parser.add_argument("--length", type=int, default=8, help="tokens per prompt")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats after the compiling call (median)")
    parser.add_argument("--chunk", type=int, default=64, help="sites vmapped at once in sweeps")
    parser.add_argument("--peers", default="tl,hf", help="tl (TransformerLens, in benchmarks/.venv-peer), hf, or ''")
    parser.add_argument("--peer-sites", type=int, default=12, help="sites each peer patches (evenly spread subset)")
    parser.add_argument("--train-batch", type=int, default=8, help="train-step prompts per batch (forget and maintain "
                        "each; the default sweep's train.batch_size)")
    parser.add_argument("--train-length", type=int, default=24, help="train-step tokens per prompt (the default "
                        "sweep's: its one-shot sports prompts are 19-24 tokens, one bucket of 24)")
    parser.add_argument("--lora-rank", type=int, default=64, help="LoRA step rank (the default sweep's relearn.lora_rank)")
    parser.add_argument("--data", type=int, default=1, help="train steps with params on a data=N mesh, batches sharded "
                        "over it (needs N devices: XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU)")
    parser.add_argument("--no-cache", action="store_true", help="no persistent compilation cache (default: "
                        "~/.cache/jaxedit/xla, so a second run's compile_s is the warm-cache first call)")
    args = parser.parse_args(argv)
    if args.data > jax.device_count():
        parser.error(f"--data {args.data} needs {args.data} devices, {jax.device_count()} are visible: set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={args.data}")
    if not args.no_cache:
        use_persistent_cache(cache_dir() / "xla")
    if args.quick:
        args.models, args.prompts, args.length, args.peer_sites = suite.GPT2, 2, 8, 8
    info = suite.machine()
    info["matmul_gflops"] = round(suite.matmul_gflops(), 1)
    print(f"machine: {info}", flush=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    threads = os.cpu_count()
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        start = time.perf_counter()
        model = jaxedit.load(str(suite.model_dir(name)))
        print(f"{name}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
        p = suite.prompts(model.cfg, args.prompts, args.length)
        train_p = suite.prompts(model.cfg, args.train_batch, args.train_length, seed=1)
        cfg = model.cfg
        matmul = round(suite.matmul_gflops(), 1)  # re-measured per model: the shared machine's load drifts
        print(f"{name}: dense matmul {matmul} GFLOP/s, load {os.getloadavg()[0]:.2f}", flush=True)
        jx_rows, ours = suite.run_jaxedit(name, model, p, matmul, args.repeats, args.chunk, train_p, args.lora_rank)
        if args.data > 1:  # the same train steps with params on a data=N mesh and the batches sharded over it
            mesh = sharding.make_mesh(sharding.MeshSpec(data=args.data), jax.devices()[:args.data])
            placed = dataclasses.replace(model, params=sharding.shard_params(
                model.params, sharding.param_shardings(cfg, mesh)))
            jx_rows += suite.train_rows(name, placed, train_p, matmul, args.repeats, args.lora_rank)[0]
        for r in jx_rows:
            r.update(matmul_gflops=matmul, loadavg=round(os.getloadavg()[0], 2))
            r.setdefault("batch", f"{args.prompts}×{args.length}")
            r.setdefault("devices", 1)
        jx_rows[0]["resid_full_vs_reuse_maxdiff"] = ours.get("resid_pre_full_maxdiff")
        rows += jx_rows
        print(table(jx_rows), flush=True)
        for backend in [b for b in args.peers.split(",") if b]:
            peer = suite.run_peer(backend, name, model, p, args.peer_sites, threads, train_p, args.lora_rank)
            new = suite.peer_rows(backend, name, cfg, p, peer, ours, matmul,
                                  [r for r in jx_rows if r.get("devices", 1) == 1], train_p)
            for r in new:
                r.update(matmul_gflops=matmul, loadavg=round(os.getloadavg()[0], 2))
                r.setdefault("batch", f"{args.prompts}×{args.length}")
            print(table(new), flush=True)
            rows += new
        del model
        jax.clear_caches()
    info["loadavg_end"] = os.getloadavg()[0]
    print(f"\nmachine: {info}\n")
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        for r in rows:
            f.write(json.dumps({"time": stamp, **info, "prompts": args.prompts, "length": args.length, **r},
                               default=float) + "\n")


if __name__ == "__main__":
    main()
