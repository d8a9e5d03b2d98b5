"""Run the benchmark suite: `python -m benchmarks [--quick] [--models a,b] [--peers tl,hf]`.

Prints a Markdown table and appends one JSON line per row (with the machine description) to
benchmarks/results/results.jsonl. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

import jaxedit  # noqa: E402
from benchmarks import suite  # noqa: E402

RESULTS = suite.HERE / "results" / "results.jsonl"
COLUMNS = ("model", "path", "impl", "compile_s", "steady_s", "fwd_per_s", "tokens_per_s", "gflops", "frac_matmul",
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
    args = parser.parse_args(argv)
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
        cfg = model.cfg
        matmul = round(suite.matmul_gflops(), 1)  # re-measured per model: the shared machine's load drifts
        print(f"{name}: dense matmul {matmul} GFLOP/s, load {os.getloadavg()[0]:.2f}", flush=True)
        jx_rows, ours = suite.run_jaxedit(name, model, p, matmul, args.repeats, args.chunk)
        for r in jx_rows:
            r.update(matmul_gflops=matmul, loadavg=round(os.getloadavg()[0], 2))
        jx_rows[0]["resid_full_vs_reuse_maxdiff"] = ours.get("resid_pre_full_maxdiff")
        rows += jx_rows
        print(table(jx_rows), flush=True)
        for backend in [b for b in args.peers.split(",") if b]:
            peer = suite.run_peer(backend, name, model, p, args.peer_sites, threads)
            new = suite.peer_rows(backend, name, cfg, p, peer, ours, matmul, jx_rows)
            for r in new:
                r.update(matmul_gflops=matmul, loadavg=round(os.getloadavg()[0], 2))
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
