"""Attribution patching against an independent torch-autograd computation on the same HF model."""

import numpy as np
import pytest
import torch

import jaxedit
from jaxedit.errors import JaxeditError
from jaxedit.localize.attribution import attribution_patching
from tiny_models import VOCAB, hf_forward, hf_positions, padded_batch, save_hf_model

SITES = ("attn_q", "attn_k", "attn_v", "attn_z", "mlp_in", "mlp_out", "mlp_hidden", "resid_pre")
COMPONENTS = ("attn_q", "attn_k", "attn_v", "attn_z", "mlp_in", "mlp_out")


@pytest.fixture(scope="module", params=["llama3_gqa", "gemma3"])
def setup(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, path)
    clean, mask = padded_batch("left", lengths=(9, 7, 5, 9, 6), seed=5)
    rng = np.random.default_rng(6)
    corrupt = clean.copy()
    for row, n in enumerate(mask.sum(1)):  # a two-token "subject" inside each prompt, resampled
        start = clean.shape[1] - n + 1
        corrupt[row, start:start + 2] = rng.integers(3, VOCAB, 2)
    answer = hf_forward(hf, clean, mask).logits[:, -1].argmax(-1).numpy()  # what the model predicts
    others = rng.integers(3, VOCAB, (len(clean), 2))
    return hf, jaxedit.load(path), (clean, corrupt, mask, answer, others)


class TorchRun:
    """One HF forward with hooks recording every site per layer (grads retained if `grad`).

    drop: layer whose residual contributions (attention and MLP outputs) are detached (GradDrop).
    replace: ((site, layer), tensor) written over that site's output (the QK-fix reference).
    """

    def __init__(self, hf, ids, mask, grad=False, drop=None, replace=None):
        self.acts, handles = {}, []
        post_norms = hasattr(hf.model.layers[0], "post_feedforward_layernorm")

        def record(site, layer, t):
            if grad and t.requires_grad:
                t.retain_grad()
            self.acts[site, layer] = t

        def on_output(site, layer, detach=False, index=None):
            def hook(mod, args, out):
                t = out if index is None else out[index]
                if replace is not None and replace[0] == (site, layer):
                    t = replace[1].clone()
                record(site, layer, t)
                if detach and layer == drop:
                    t = t.detach()
                if index is None:
                    return t
                return (t,) + tuple(out[1:]) if index == 0 else out
            return hook

        def on_input(site, layer):
            return lambda mod, args: record(site, layer, args[0])

        for layer, block in enumerate(hf.model.layers):
            attn, mlp = block.self_attn, block.mlp
            handles += [block.register_forward_pre_hook(on_input("resid_pre", layer)),
                        attn.q_proj.register_forward_hook(on_output("attn_q", layer)),
                        attn.k_proj.register_forward_hook(on_output("attn_k", layer)),
                        attn.v_proj.register_forward_hook(on_output("attn_v", layer)),
                        attn.o_proj.register_forward_pre_hook(on_input("attn_z", layer)),
                        attn.register_forward_hook(on_output("pattern", layer, index=1)),
                        mlp.register_forward_pre_hook(on_input("mlp_in", layer)),
                        mlp.down_proj.register_forward_pre_hook(on_input("mlp_hidden", layer))]
            if post_norms:
                handles += [block.post_attention_layernorm.register_forward_hook(on_output("attn_out", layer, True)),
                            block.post_feedforward_layernorm.register_forward_hook(on_output("mlp_out", layer, True))]
            else:
                handles += [attn.register_forward_hook(on_output("attn_out", layer, True, index=0)),
                            mlp.register_forward_hook(on_output("mlp_out", layer, True))]
        try:
            with torch.set_grad_enabled(grad):
                self.logits = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                 position_ids=torch.as_tensor(hf_positions(mask))).logits[:, -1]
        finally:
            for handle in handles:
                handle.remove()


def _mean_logit_diff(logits, answer, others):
    rows = torch.arange(len(answer))
    return (logits[rows, torch.as_tensor(answer)] - logits[rows[:, None], torch.as_tensor(others)].mean(-1)).mean()


def _per_head(t, n):
    """[B,T,n*E] -> [B,T,n,E]."""
    return t.reshape(t.shape[0], t.shape[1], n, -1)


def torch_scores(hf, data, cfg, sites, qk_fix=False, drop=None):
    """Δ·grad per site summed over batch, positions and features (normalized as ours)."""
    clean, corrupt, mask, answer, others = data
    corrupted = TorchRun(hf, corrupt, mask)
    run = TorchRun(hf, clean, mask, grad=True, drop=drop)
    metric = _mean_logit_diff(run.logits, answer, others)
    metric.backward()
    denominator = metric.item() - float(_mean_logit_diff(corrupted.logits, answer, others))
    heads = {"attn_q": cfg.n_heads, "attn_z": cfg.n_heads, "attn_k": cfg.n_kv_heads, "attn_v": cfg.n_kv_heads}
    out = {}
    for site in sites:
        rows = []
        for layer in range(cfg.n_layers):
            if qk_fix and site in ("attn_q", "attn_k"):
                rows.append(_qk_fixed(hf, run, corrupted, clean, mask, site, layer, cfg))
                continue
            act = run.acts[site, layer]
            grad = torch.zeros_like(act) if act.grad is None else act.grad
            product = ((corrupted.acts[site, layer] - act) * grad).detach()
            if site in heads:
                rows.append(_per_head(product, heads[site]).sum((0, 1, 3)))
            elif site == "mlp_hidden":
                rows.append(product.sum((0, 1)))
            elif site == "resid_pre":
                rows.append(product.sum((0, 2)))
            else:
                rows.append(product.sum())
        out[site] = torch.stack(rows).numpy() / denominator
    return out


def _qk_fixed(hf, run, corrupted, clean, mask, site, layer, cfg):
    """Σ ΔA·∂M/∂A with A recomputed by HF with this layer's q (or k) taken from the corrupted run."""
    patched = TorchRun(hf, clean, mask, replace=((site, layer), corrupted.acts[site, layer]))
    pattern = run.acts["pattern", layer]
    grad = torch.zeros_like(pattern) if pattern.grad is None else pattern.grad
    per_head = ((patched.acts["pattern", layer] - pattern) * grad).detach().sum((0, 2, 3))  # [H]
    return per_head if site == "attn_q" else per_head.reshape(cfg.n_kv_heads, -1).sum(-1)


def _assert_close(ours, ref):
    scale = max(np.abs(ref).max(), 1e-3)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-5 * scale)


def test_atp_scores_equal_torch_autograd(setup):
    hf, model, data = setup
    clean, corrupt, mask, answer, others = data
    result = attribution_patching(model.params, model.cfg, clean, corrupt, mask, (answer, others),
                                  sites=SITES, chunk=2)
    ref = torch_scores(hf, data, model.cfg, SITES)
    assert result.method == "atp" and result.axes["attn_k"] == ("layer", "kv_head")
    assert result.scores["attn_k"].shape == (model.cfg.n_layers, model.cfg.n_kv_heads)
    for site in SITES:
        assert np.abs(ref[site]).max() > 1e-4, site  # the corruption matters at every site kind
        _assert_close(result.scores[site], ref[site])


def test_atp_star_equals_torch_exact_patterns_and_detached_layers(setup):
    """QK fix: HF's own attention recomputed with one layer's q (k) from the corrupted run; GradDrop:
    HF backward with one layer's attention and MLP outputs detached."""
    hf, model, data = setup
    clean, corrupt, mask, answer, others = data
    cfg = model.cfg
    result = attribution_patching(model.params, cfg, clean, corrupt, mask, (answer, others),
                                  sites=COMPONENTS, qk_fix=True, grad_drop=True, chunk=3)
    signed = torch_scores(hf, data, cfg, COMPONENTS, qk_fix=True)
    per_layer = [torch_scores(hf, data, cfg, COMPONENTS, qk_fix=True, drop=layer) for layer in range(cfg.n_layers)]
    assert result.method == "atp*"
    for site in COMPONENTS:
        _assert_close(result.signed[site], signed[site])
        ref = sum(np.abs(scores[site]) for scores in per_layer) / (cfg.n_layers - 1)
        _assert_close(result.scores[site], ref)
        assert (result.scores[site] >= 0).all()
    plain = torch_scores(hf, data, cfg, ("attn_q", "attn_k"))
    assert np.abs(plain["attn_q"] - signed["attn_q"]).max() > 1e-3  # the fix changes q/k scores here


def test_bad_input_fails_with_one_line(setup):
    _, model, data = setup
    clean, corrupt, mask, answer, others = data
    with pytest.raises(JaxeditError, match="not supported"):
        attribution_patching(model.params, model.cfg, clean, corrupt, mask, (answer, others), sites=("attn_out",))
    with pytest.raises(JaxeditError, match="grad_drop"):
        attribution_patching(model.params, model.cfg, clean, corrupt, mask, (answer, others),
                             sites=("resid_pre",), grad_drop=True)
    with pytest.raises(JaxeditError, match="must all be"):
        attribution_patching(model.params, model.cfg, clean, corrupt[:, 1:], mask, (answer, others))
