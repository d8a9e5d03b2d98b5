"""Compiled memory of patching sweeps: bounded by the chunk size, not by the number of sites.

    python -m benchmarks.memory

Compiles (never runs) activation-patching sweeps of a GPT-2-small-shaped model from shapes alone
and reads XLA's memory analysis: temporary bytes for several chunk sizes, and for sweeps over
L×H sites versus L×H×T sites at the same chunk size. Appends JSON lines to results/memory.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxedit.localize import metrics
from jaxedit.localize.activation_patching import _sweep
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import init_params

RESULTS = Path(__file__).parent / "results" / "memory.jsonl"
GPT2_SMALL = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
              "n_head": 12}


def temp_mib(cfg, params, batch: int, length: int, site: str, by_position: bool, chunk: int) -> float:
    """XLA temporary allocation (MiB) of one compiled sweep."""
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    ids = jax.ShapeDtypeStruct((batch,), jnp.int32)
    lowered = _sweep.lower(params, tokens, tokens, tokens, (ids, ids), cfg=cfg, metric=metrics.logit_diff,
                           site=site, by_position=by_position, chunk_size=chunk, prefix_reuse=True)
    return lowered.compile().memory_analysis().temp_size_in_bytes / 2**20


def main():
    cfg = config_from_hf(GPT2_SMALL)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    batch, length = 8, 32
    rows = []
    for chunk in (8, 32, 128):
        for site, by_position in (("attn_z", False), ("attn_z", True), ("resid_pre", True)):
            n_sites = cfg.n_layers * (cfg.n_heads if site == "attn_z" else 1) * (length if by_position else 1)
            rows.append({"model": "gpt2-small-shape", "batch": batch, "length": length, "site": site,
                         "by_position": by_position, "sites": n_sites, "chunk": chunk,
                         "temp_mib": round(temp_mib(cfg, params, batch, length, site, by_position, chunk), 1),
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(rows[-1], flush=True)
    print("\n| site | sites | chunk | temp MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['site']}{' × pos' if r['by_position'] else ''} | {r['sites']} | {r['chunk']} | {r['temp_mib']} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
