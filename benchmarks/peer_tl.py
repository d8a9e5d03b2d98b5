"""Peer side of the benchmark: the same sweeps in TransformerLens or in plain HF-torch with hooks.

    python benchmarks/peer_tl.py < request.json > reply.json

Runs in its own process in benchmarks/.venv-peer (TransformerLens and PEFT installed there), so
nothing of it is imported by jaxedit. Request (JSON):
  {"backend": "tl"|"hf", "model_dir": str, "clean": [[int]] [B,T], "corrupt": [[int]], "answer": [B],
   "other": [B], "tasks": [...], "sites": {task: [[i, j], ...]}, "threads": int,
   "noise": [S,B,T,D] (causal tracing), "subject": [[bool]] [B,T],
   "train": {"tokens": [[int]] [B',T'], "answer": [B'], "other": [B'], "lora_rank": int} (train steps)}
tasks: "resid_pre", "attn_z", "atp" (TL); "resid_pre", "attn_z", "forward", "forward_backward",
"causal_tracing", "train_step", "lora_step" (HF). `sites` lists the (layer, pos), (layer, head) or,
for causal tracing, (layer, head or H for the MLP) indices (a subset keeps the peer's time bounded;
its rate per patched forward is what is compared). Patching metric: mean over prompts of the
last-position logit difference logits[answer] − logits[other], patching clean into corrupt. Every
HF forward passes `logits_to_keep=1`: it unembeds the last position only, as jaxedit does (TL has
no such option).
Reply: {task: {"scores" or "value": ..., "seconds": float, "forwards": int}, "load_s": float,
"versions": {...}}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def logit_diff(logits, answer, other):
    """Mean over prompts of last-position logit(answer) − logit(other); logits [B,T,V] or [B,V]."""
    last = logits[:, -1] if logits.ndim == 3 else logits
    rows = torch.arange(last.shape[0])
    return (last[rows, answer] - last[rows, other]).mean()


# ---------------------------------------------------------------- TransformerLens


def tl_run(req, clean, corrupt, answer, other):
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=torch.float32)
    tok_dir = req.get("tokenizer_dir") or req["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = TransformerBridge.boot_transformers(req["model_dir"], hf_model=hf, tokenizer=tokenizer)
    model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    out = {"load_s": time.perf_counter() - start}
    metric = lambda logits: logit_diff(logits, answer, other)  # noqa: E731
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    for task in req["tasks"]:
        if task == "atp":
            out[task] = tl_atp(model, clean, corrupt, metric)
            continue
        fn, cols = {"resid_pre": (patching.get_act_patch_resid_pre, ["layer", "pos"]),
                    "attn_z": (patching.get_act_patch_attn_head_out_all_pos, ["layer", "head"])}[task]
        index_df = pd.DataFrame(req["sites"][task], columns=cols)
        with torch.no_grad():  # warm-up (first hooked forward), untimed
            fn(model, corrupt, clean_cache, metric, index_axis_names=None, index_df=index_df.iloc[:1])
        start = time.perf_counter()
        with torch.no_grad():
            scores = fn(model, corrupt, clean_cache, metric, index_axis_names=None, index_df=index_df)
        out[task] = {"scores": scores.tolist(), "seconds": time.perf_counter() - start, "forwards": len(index_df)}
    return out


def tl_atp(model, clean, corrupt, metric):
    """TransformerLens's attribution-patching recipe: fwd hooks cache, bwd hooks cache grads, one backward."""
    names = lambda n: n.endswith(("hook_resid_pre", "attn.hook_z", "hook_mlp_out"))  # noqa: E731
    start = time.perf_counter()
    with torch.no_grad():
        _, corrupt_cache = model.run_with_cache(corrupt, names_filter=names)
    acts, grads = {}, {}

    def alias(name):  # the bridge calls blocks.{l}.hook_resid_pre's hook under its own name blocks.{l}.hook_in
        return re.sub(r"^(blocks\.\d+)\.hook_in$", r"\1.hook_resid_pre", name)

    def fwd(act, hook):
        acts[alias(hook.name)] = act.detach()

    def bwd(grad, hook):
        grads[alias(hook.name)] = grad.detach()

    model.reset_hooks()
    model.add_hook(names, fwd, "fwd")
    model.add_hook(names, bwd, "bwd")
    value = metric(model(clean))
    value.backward()
    model.reset_hooks()
    model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    n_layers = model.cfg.n_layers
    scores = {"resid_pre": [], "attn_z": [], "mlp_out": []}
    for layer in range(n_layers):
        for site, name, reduce in (("resid_pre", f"blocks.{layer}.hook_resid_pre", (0, 2)),
                                   ("attn_z", f"blocks.{layer}.attn.hook_z", (0, 1, 3)),
                                   ("mlp_out", f"blocks.{layer}.hook_mlp_out", (0, 1, 2))):
            attr = ((corrupt_cache[name] - acts[name]) * grads[name]).sum(reduce)
            scores[site].append(attr.tolist())
    return {"scores": scores, "seconds": seconds, "forwards": 2}


# ---------------------------------------------------------------- plain HF-torch with hooks


def _layers(hf):
    body = getattr(hf, "model", None) or hf.transformer
    return list(body.layers if hasattr(body, "layers") else body.h)


def _o_proj(layer):
    attn = getattr(layer, "self_attn", None) or layer.attn
    return attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj


def hf_run(req, clean, corrupt, answer, other):
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=torch.float32).eval()
    out = {"load_s": time.perf_counter() - start}
    layers = _layers(hf)
    cfg = hf.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads)
    out.update(hf_dense_tasks(req, hf, clean, answer, other))
    if "causal_tracing" in req["tasks"]:
        out["causal_tracing"] = hf_causal_tracing(req, hf, clean, answer)
    for task in req["tasks"]:
        if task not in ("resid_pre", "attn_z"):
            continue
        start = time.perf_counter()
        saved = {}
        hooks = []
        module = (lambda l: layers[l]) if task == "resid_pre" else (lambda l: _o_proj(layers[l]))  # noqa: E731
        wanted = sorted({l for l, _ in req["sites"][task]})
        for l in wanted:  # one clean forward caching the inputs of the hooked modules
            hooks.append(module(l).register_forward_pre_hook(
                lambda m, args, kwargs, l=l: saved.__setitem__(l, (args[0] if args else kwargs["hidden_states"]).clone()),
                with_kwargs=True))
        with torch.no_grad():
            hf(clean, logits_to_keep=1)
        for h in hooks:
            h.remove()
        scores = []
        for l, j in req["sites"][task]:  # one patched forward per site: the usual hook loop
            def patch(m, args, kwargs, l=l, j=j):
                x = (args[0] if args else kwargs["hidden_states"]).clone()
                if task == "resid_pre":
                    x[:, j] = saved[l][:, j]
                else:
                    x[..., j * head_dim:(j + 1) * head_dim] = saved[l][..., j * head_dim:(j + 1) * head_dim]
                if args:
                    return (x,) + tuple(args[1:]), kwargs
                return args, dict(kwargs, hidden_states=x)
            h = module(l).register_forward_pre_hook(patch, with_kwargs=True)
            with torch.no_grad():
                scores.append(float(logit_diff(hf(corrupt, logits_to_keep=1).logits, answer, other)))
            h.remove()
        out[task] = {"scores": scores, "seconds": time.perf_counter() - start, "forwards": len(scores) + 1}
    out.update(hf_train_steps(req, hf))
    return out


def _timed(fn, repeats=3):
    """(last result, median seconds of `repeats` calls after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, sorted(times)[len(times) // 2]


def _mlp_out_module(layer):
    """The module whose output is jaxedit's mlp_out: the post-MLP norm where the family has one."""
    return getattr(layer, "post_feedforward_layernorm", None) or layer.mlp


def _embedding(hf):
    body = getattr(hf, "model", None) or hf.transformer
    return body.embed_tokens if hasattr(body, "embed_tokens") else body.wte


def hf_dense_tasks(req, hf, clean, answer, other):
    """Plain forward and forward+backward (all parameter grads) of the clean batch: {task: reply}."""
    out = {}
    if "forward" in req["tasks"]:
        with torch.no_grad():
            value, seconds = _timed(lambda: float(logit_diff(hf(clean, logits_to_keep=1).logits, answer, other)))
        out["forward"] = {"value": value, "seconds": seconds, "forwards": 1}
    if "forward_backward" in req["tasks"]:
        def fwd_bwd():
            hf.zero_grad(set_to_none=True)
            loss = logit_diff(hf(clean, logits_to_keep=1).logits, answer, other)
            loss.backward()
            return float(loss)
        value, seconds = _timed(fwd_bwd)
        hf.zero_grad(set_to_none=True)
        out["forward_backward"] = {"value": value, "seconds": seconds, "forwards": 1}
    return out


def hf_causal_tracing(req, hf, clean, answer):
    """Noise the subject's embeddings (the request's noise), restore one head's z or one MLP output from
    the clean run, per requested set: NIE of the answer probability (mean over prompts)."""
    layers = _layers(hf)
    heads = hf.config.num_attention_heads if hasattr(hf.config, "num_attention_heads") else hf.config.n_head
    noise = torch.tensor(req["noise"], dtype=torch.float32)[0]  # one noise sample [B,T,D]
    rows = torch.arange(clean.shape[0])
    prob = lambda logits: torch.softmax(logits[:, -1].float(), -1)[rows, answer]  # noqa: E731
    saved, hooks = {}, []
    for i, layer in enumerate(layers):  # one clean forward caching o_proj inputs and MLP outputs
        hooks.append(_o_proj(layer).register_forward_pre_hook(
            lambda m, args, i=i: saved.__setitem__(("z", i), args[0].clone())))
        hooks.append(_mlp_out_module(layer).register_forward_hook(
            lambda m, args, output, i=i: saved.__setitem__(("mlp", i), output.clone())))
    with torch.no_grad():
        p_clean = prob(hf(clean, logits_to_keep=1).logits)
    for h in hooks:
        h.remove()
    noised = _embedding(hf).register_forward_hook(lambda m, args, output: output + noise)
    with torch.no_grad():
        p_corrupt = prob(hf(clean, logits_to_keep=1).logits)
    head_dim = saved[("z", 0)].shape[-1] // heads
    start = time.perf_counter()
    scores = []
    for l, j in req["sites"]["causal_tracing"]:
        if j < heads:
            def restore(m, args, l=l, j=j):
                x = args[0].clone()
                x[..., j * head_dim:(j + 1) * head_dim] = saved[("z", l)][..., j * head_dim:(j + 1) * head_dim]
                return (x,) + tuple(args[1:])
            h = _o_proj(layers[l]).register_forward_pre_hook(restore)
        else:
            h = _mlp_out_module(layers[l]).register_forward_hook(lambda m, args, output, l=l: saved[("mlp", l)])
        with torch.no_grad():
            p = prob(hf(clean, logits_to_keep=1).logits)
        h.remove()
        scores.append(float(((p - p_corrupt) / (p_clean - p_corrupt)).mean()))
    seconds = time.perf_counter() - start
    noised.remove()
    return {"scores": scores, "seconds": seconds, "forwards": len(scores)}


def hf_train_steps(req, hf):
    """One AdamW micro-step on forget (answer) + maintain (other) cross-entropy at the last position of
    the request's train batch: MLP weights only ("train_step"), or PEFT LoRA of rank r, alpha 2r, on all
    linear layers ("lora_step")."""
    import torch.nn.functional as F
    out = {}
    batch = req["train"]
    clean = torch.tensor(batch["tokens"])
    answer, other = torch.tensor(batch["answer"]), torch.tensor(batch["other"])

    def make_step(model, trainable):
        opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(clean, logits_to_keep=1).logits[:, -1]
            logits_m = model(clean, logits_to_keep=1).logits[:, -1]
            loss = F.cross_entropy(logits, answer) + F.cross_entropy(logits_m, other)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            return float(loss)
        return step

    if "train_step" in req["tasks"]:
        state = {n: p.detach().clone() for n, p in hf.named_parameters()}
        for name, p in hf.named_parameters():
            p.requires_grad_(".mlp." in name)
        step = make_step(hf, [p for p in hf.parameters() if p.requires_grad])
        first = step()
        _, seconds = _timed(step)
        out["train_step"] = {"value": first, "seconds": seconds, "forwards": 2}
        with torch.no_grad():  # back to the loaded weights for the LoRA step
            for name, p in hf.named_parameters():
                p.copy_(state[name])
                p.requires_grad_(True)
    if "lora_step" in req["tasks"]:
        from peft import LoraConfig, get_peft_model
        rank = batch["lora_rank"]
        model = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                              target_modules="all-linear"))
        step = make_step(model, [p for p in model.parameters() if p.requires_grad])
        first = step()
        _, seconds = _timed(step)
        out["lora_step"] = {"value": first, "seconds": seconds, "forwards": 2}
    return out


def main():
    req = json.load(sys.stdin)
    torch.set_num_threads(req.get("threads") or torch.get_num_threads())
    clean, corrupt = torch.tensor(req["clean"]), torch.tensor(req["corrupt"])
    answer, other = torch.tensor(req["answer"]), torch.tensor(req["other"])
    run = {"tl": tl_run, "hf": hf_run}[req["backend"]]
    out = run(req, clean, corrupt, answer, other)
    versions = {"torch": torch.__version__}
    try:
        from importlib.metadata import version
        versions["transformers"] = version("transformers")
        if req["backend"] == "tl":
            versions["transformer_lens"] = version("transformer-lens")
    except Exception:  # noqa: BLE001  (versions are informative only)
        pass
    out["versions"] = versions
    import resource
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
