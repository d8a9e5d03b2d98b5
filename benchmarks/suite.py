"""The benchmark suite: jaxedit's hot paths timed beside TransformerLens and an HF-torch hook loop.

Every row: compile time (first call − steady), steady seconds (median of repeats), patched forwards
per second, tokens per second, achieved GFLOP/s from the analytic count in `flops.py`, that as a
fraction of this process's measured dense float32 matmul throughput, and the process's RSS
high-water mark after the row (monotone over the run: it bounds, not isolates, a row's memory).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops
from jaxedit.edit import lora as lora_mod
from jaxedit.edit import optim, train
from jaxedit.localize import activation_patching, attribution, causal_tracing, corruptions, metrics
from jaxedit.models import core, registry

HERE = Path(__file__).parent
PEER_PY = HERE / ".venv-peer" / "bin" / "python"
GPT2 = "gpt2-small-random"
TRACING_KEY = jax.random.key(0)
TRAIN_LABEL, LORA_LABEL = "masked train step (MLPs)", "LoRA step (all linears)"
RESID_LABEL, HEADS_LABEL = "patch resid_pre L×T prefix-reuse", "patch attn_z L×H prefix-reuse"
TRACING_LABEL = "causal tracing heads+MLPs (1 noise samples)"


# ---------------------------------------------------------------- machine and models


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform, "loadavg_start": os.getloadavg()[0]}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Dense float32 [n,n]@[n,n] throughput of this device, GFLOP/s (median)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    _, steady = timed(f, a, repeats=repeats)
    return 2 * n ** 3 / steady / 1e9


def gpt2_dir() -> Path:
    """A GPT-2-small-sized random model (torch's GPT-2 init, seed 0) as a HF dir, so peers share its weights."""
    out = registry.cache_dir() / "bench" / "gpt2-small-random-v1"
    if not (out / "config.json").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(out)
    return out


def model_dir(name: str) -> Path:
    return gpt2_dir() if name == GPT2 else registry.resolve(name)


def tokenizer_dir(name: str) -> Path:
    """A tokenizer the TL bridge can boot with (the random GPT-2 has none: borrow SmolLM2's; ids are given)."""
    return registry.resolve("smollm2-135m") if name == GPT2 else registry.resolve(name)


def prompts(cfg, n: int, t: int, seed: int = 0) -> dict:
    """Random token pairs [n,t] differing at positions 1..2 (the 'subject'), answer/other ids [n], full mask."""
    rng = np.random.default_rng(seed)
    hi = min(cfg.vocab_size, 30000)
    clean = rng.integers(10, hi, (n, t))
    corrupt = clean.copy()
    corrupt[:, 1:3] = rng.integers(10, hi, (n, 2))
    subject = np.zeros((n, t), bool)
    subject[:, 1:3] = True
    return {"clean": clean.astype(np.int32), "corrupt": corrupt.astype(np.int32), "mask": np.ones((n, t), np.int32),
            "subject": subject, "answer": rng.integers(10, hi, n).astype(np.int32),
            "other": rng.integers(10, hi, n).astype(np.int32)}


# ---------------------------------------------------------------- timing


def timed(fn, *args, repeats: int):
    """(first-call seconds, median steady seconds) of fn(*args), results blocked on."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def row(model, path, first, steady, *, forwards, tokens, flop, matmul, impl="jaxedit", **extra) -> dict:
    return {"model": model, "path": path, "impl": impl, "compile_s": round(max(first - steady, 0.0), 2),
            "steady_s": round(steady, 4), "fwd_per_s": round(forwards / steady, 2) if forwards else None,
            "tokens_per_s": round(tokens / steady, 1), "gflops": round(flop / steady / 1e9, 2),
            "frac_matmul": round(flop / steady / 1e9 / matmul, 3), "peak_rss_mb": round(rss_mb()), **extra}


# ---------------------------------------------------------------- jaxedit hot paths


def run_jaxedit(name, model, p, matmul, repeats, chunk, train_p, lora_rank) -> tuple[list[dict], dict]:
    """Rows of every hot path for one model (patching on prompts `p`, train steps on `train_p`), and the
    score arrays the peers are checked against."""
    cfg, params = model.cfg, model.params
    b, t = p["clean"].shape
    clean, corrupt, mask = (jnp.asarray(p[k]) for k in ("clean", "corrupt", "mask"))
    answer, other = jnp.asarray(p["answer"]), jnp.asarray(p["other"])
    last = core.last_positions(mask)
    rows, scores = [], {}
    fwd = flops.forward(cfg, b, t)

    @jax.jit
    def plain(params, tokens):
        return core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=last)[0]

    first, steady = timed(plain, params, clean, repeats=max(repeats, 3))
    rows.append(row(name, "forward", first, steady, forwards=1, tokens=b * t, flop=fwd, matmul=matmul))
    scores["forward"] = float(metrics.logit_diff(plain(params, clean)[:, 0], answer, other).mean())

    @jax.jit
    def fwd_bwd(params, tokens):
        def loss(params):
            logits = core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=last)[0][:, 0]
            return metrics.logit_diff(logits, answer, other).mean()
        return jax.value_and_grad(loss)(params)

    first, fb_steady = timed(fwd_bwd, params, clean, repeats=max(repeats, 3))
    scores["forward_backward"] = float(fwd_bwd(params, clean)[0])
    rows.append(row(name, "forward+backward (param grads)", first, fb_steady, forwards=1, tokens=b * t,
                    flop=flops.forward_backward(cfg, b, t), matmul=matmul))

    sweeps = [("resid_pre", True), ("resid_pre", False), ("attn_z", True)]
    for site, reuse in sweeps:
        run = partial(activation_patching.patching_sweep, params, cfg, clean, corrupt, mask, metric=metrics.logit_diff,
                      metric_args=(answer, other), site=site, chunk_size=chunk, prefix_reuse=reuse)
        result = []
        first, steady = timed(lambda: result.append(run()) or 0, repeats=repeats)
        n_sites = cfg.n_layers * (t if site == "resid_pre" else cfg.n_heads)
        flop = flops.sweep(cfg, b, t, site, reuse)
        label = f"patch {site} {'L×T' if site == 'resid_pre' else 'L×H'}" + (" prefix-reuse" if reuse else " full")
        rows.append(row(name, label, first, steady, forwards=n_sites, tokens=n_sites * b * t, flop=flop,
                        matmul=matmul, sites=n_sites, flop_vs_full=round(flop / flops.sweep(cfg, b, t, site, False), 3)))
        scores.setdefault(site, result[-1].scores)
        if site == "resid_pre" and not reuse:
            scores["resid_pre_full_maxdiff"] = float(np.abs(result[-1].scores - scores["resid_pre"]).max())

    sites = tuple(s for s in attribution.ATTRIBUTION_SITES)
    result = []
    run = partial(attribution.attribution_patching, params, cfg, clean, corrupt, mask, (answer, other),
                  sites=sites, normalize=False, chunk=b)
    first, steady = timed(lambda: result.append(run()) or 0, repeats=max(repeats, 3))
    rows.append(row(name, "attribution patching (all sites)", first, steady, forwards=2, tokens=2 * b * t,
                    flop=flops.atp(cfg, b, t), matmul=matmul, vs_fwd_bwd=round(steady / fb_steady, 2)))
    scores["atp"] = result[-1].scores

    samples = 1
    run = partial(causal_tracing.trace_components, params, cfg, p["clean"], p["mask"], p["subject"], p["answer"],
                  TRACING_KEY, noise=tracing_noise(model, p)[1], samples=samples, chunk=cfg.n_heads + 1)
    result = []
    first, steady = timed(lambda: result.append(run()) or 0, repeats=repeats)
    nie = result[-1].nie
    scores["causal_tracing"] = np.concatenate([nie["attn_z"], nie["mlp_out"][:, None]], axis=1)  # [L, H+1]
    n_sets = cfg.n_layers * (cfg.n_heads + 1)
    rows.append(row(name, TRACING_LABEL, first, steady,
                    forwards=n_sets * samples, tokens=n_sets * samples * b * t,
                    flop=flops.tracing(cfg, b, t, samples), matmul=matmul, sites=n_sets))

    train, first_losses = train_rows(name, model, train_p, matmul, repeats, lora_rank)
    scores.update(first_losses)
    return rows + train, scores


def tracing_noise(model, p) -> tuple[np.ndarray, float]:
    """The subject noise [1,B,T,D] causal tracing draws from TRACING_KEY, and its ROME scale (sent to the peer)."""
    cfg, tokens = model.cfg, np.asarray(p["clean"])
    scale = corruptions.noise_scale(model.params["embed"]["tokens"], tokens, p["subject"], "rome", cfg.embed_scale)
    scale = float(scale[0])  # 'rome': one std for the batch
    noise = corruptions.subject_noise(TRACING_KEY, jnp.asarray(p["subject"]), cfg.d_model, scale, 1)
    return np.asarray(noise), scale


def train_rows(name, model, p, matmul, repeats, lora_rank: int) -> tuple[list[dict], dict]:
    """One masked micro-step (all MLPs trainable) and one LoRA (rank `lora_rank`, alpha 2·rank, all linears)
    micro-step on the forget (answer) and maintain (other) batches of `p`; their rows and the loss of each's
    first step (at the loaded weights: what the peer's first step must also give). Params placed on a mesh
    with a 'data' axis shard the batch there (`sharding.on_data`)."""
    cfg, params = model.cfg, model.params
    b, t = p["clean"].shape
    part = {"tokens": jnp.asarray(p["clean"]), "mask": jnp.asarray(p["mask"]), "target": jnp.asarray(p["answer"])}
    batch = {"forget": part, "maintain": dict(part, target=jnp.asarray(p["other"]))}
    weights = train.LossWeights(forget=1.0, maintain=1.0, lm=0.0)
    rows, first_losses = [], {}
    mlp_mask = jax.tree_util.tree_map_with_path(
        lambda path, a: np.full((1,) * a.ndim, any(getattr(k, "key", None) == "mlp" for k in path)), params)
    trainable, frozen = optim.split_trainable(params, mlp_mask)
    tmask = optim.trainable_part(mlp_mask)
    spec = train.LoraSpec(lora_rank, 2.0 * lora_rank)
    adapters = lora_mod.init_lora(params, spec.rank, jax.random.key(1))
    amask = jax.tree.map(lambda a: np.ones((1,) * a.ndim, bool), adapters)
    for task, label, tr, fr, m, lora in (("train_step", TRAIN_LABEL, trainable, frozen, tmask, None),
                                         ("lora_step", LORA_LABEL, adapters, params, amask, spec)):
        opt = optim.AdamWSpec()
        state = {"tr": jax.tree.map(jnp.copy, tr)}
        state["opt"] = opt.init(state["tr"])

        def step():
            state["tr"], state["opt"], out = train.train_step(state["tr"], fr, state["opt"], batch, cfg, weights, opt,
                                                               m, 1e-5, None, lora)
            first_losses.setdefault(task, float(out["loss"]))
            return out["loss"]

        first, steady = timed(step, repeats=max(repeats, 3))
        rows.append(row(name, label, first, steady, forwards=2, tokens=2 * b * t,
                        flop=flops.train_step(cfg, b, t, lora=lora is not None), matmul=matmul, batch=f"{b}×{t}",
                        devices=len(jax.tree.leaves(params)[0].sharding.device_set),
                        **({"lora_rank": lora_rank} if lora else {})))
    return rows, first_losses


# ---------------------------------------------------------------- peers


def peer_sites(n_layers: int, n_cols: int, k: int) -> list[list[int]]:
    """k (layer, col) indices spread evenly over the flat L×cols grid."""
    flat = np.unique(np.linspace(0, n_layers * n_cols - 1, min(k, n_layers * n_cols)).round().astype(int))
    return [[int(i // n_cols), int(i % n_cols)] for i in flat]


HF_TASKS = ("resid_pre", "attn_z", "forward", "forward_backward", "causal_tracing", "train_step", "lora_step")


def run_peer(backend, name, model, p, n_sites, threads, train_p, lora_rank) -> dict:
    """The peer's reply for one model (`peer_tl.py` in benchmarks/.venv-peer), or {"error": one line}."""
    cfg, t = model.cfg, p["clean"].shape[1]
    if not PEER_PY.exists():
        return {"error": f"no peer venv at {PEER_PY}: run benchmarks/setup_peer.sh"}
    req = {"backend": backend, "model_dir": str(model_dir(name)), "tokenizer_dir": str(tokenizer_dir(name)),
           "threads": threads, "tasks": ["resid_pre", "attn_z", "atp"] if backend == "tl" else list(HF_TASKS),
           "sites": {"resid_pre": peer_sites(cfg.n_layers, t, n_sites),
                     "attn_z": peer_sites(cfg.n_layers, cfg.n_heads, n_sites),
                     "causal_tracing": peer_sites(cfg.n_layers, cfg.n_heads + 1, n_sites)},
           "noise": tracing_noise(model, p)[0].tolist(), "subject": p["subject"].tolist(),
           "train": {"tokens": train_p["clean"].tolist(), "answer": train_p["answer"].tolist(),
                     "other": train_p["other"].tolist(), "lora_rank": lora_rank},
           **{k: p[k].tolist() for k in ("clean", "corrupt", "answer", "other")}}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([str(PEER_PY), str(HERE / "peer_tl.py")], input=json.dumps(req), capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    out = json.loads(proc.stdout)
    out["sites"] = req["sites"]
    return out


def peer_rows(backend, name, cfg, p, peer, ours, matmul, jx_rows, train_p) -> list[dict]:
    """One row per task the peer ran: its rate, FLOP/s, agreement with jaxedit and jaxedit's speed-up.
    HF unembeds the last position only (`logits_to_keep=1`, as jaxedit); TL every position."""
    impl = {"tl": "TransformerLens", "hf": "HF-torch"}[backend]
    if "error" in peer:
        return [{"model": name, "path": "peer", "impl": impl, "error": peer["error"]}]
    b, t = p["clean"].shape
    jx = {r["path"]: r for r in jx_rows}
    kept = t if backend == "tl" else 1
    full = flops.forward(cfg, b, t, unembed_positions=kept)
    tb, tt = train_p["clean"].shape
    rows = []

    def add(label, res, flop, diff, speedup, tokens=b * t, **extra):
        r = row(name, label, res["seconds"], res["seconds"], forwards=res["forwards"], tokens=res["forwards"] * tokens,
                flop=flop, matmul=matmul, impl=impl, max_abs_diff=diff, jaxedit_over_peer=round(speedup, 2), **extra)
        r["compile_s"] = None
        r["peak_rss_mb"] = round(peer.get("peak_rss_mb", 0))
        rows.append(r)

    for task, label in (("resid_pre", RESID_LABEL), ("attn_z", HEADS_LABEL), ("causal_tracing", TRACING_LABEL)):
        if task in peer:
            res, idx = peer[task], np.asarray(peer["sites"][task])
            mine = ours[task][idx[:, 0], idx[:, 1]]
            n = len(res["scores"])
            add(label.replace(" prefix-reuse", ""), dict(res, forwards=n), full * n,
                float(np.abs(np.asarray(res["scores"]) - mine).max()), jx[label]["fwd_per_s"] * res["seconds"] / n,
                sites=n, max_abs_score=float(np.abs(mine).max()))
    for task, label in (("forward", "forward"), ("forward_backward", "forward+backward (param grads)")):
        if task in peer:
            res = peer[task]
            add(label, res, full * (3 if task == "forward_backward" else 1), abs(res["value"] - ours[task]),
                res["seconds"] / jx[label]["steady_s"])
    for task, label in (("train_step", TRAIN_LABEL), ("lora_step", LORA_LABEL)):
        if task in peer:
            res = peer[task]
            add(label, res, flops.train_step(cfg, tb, tt, lora=task == "lora_step"), abs(res["value"] - ours[task]),
                res["seconds"] / jx[label]["steady_s"], tokens=tb * tt, batch=f"{tb}×{tt}",
                **({"lora_rank": jx[label]["lora_rank"]} if task == "lora_step" else {}))
    if "atp" in peer:
        res = peer["atp"]
        diff = max(float(np.abs(np.asarray(res["scores"][s]) - ours["atp"][s]).max()) for s in res["scores"])
        scale = max(float(np.abs(ours["atp"][s]).max()) for s in res["scores"])
        add("attribution patching (resid_pre, attn_z, mlp_out)", res, flops.atp(cfg, b, t, unembed_positions=kept),
            diff, res["seconds"] / jx["attribution patching (all sites)"]["steady_s"], max_abs_score=scale)
    return rows
