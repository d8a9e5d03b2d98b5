"""Qwen2, Qwen3, Mistral, GPT-NeoX and OLMo-2 (logit parity: test_parity_tiny.py over tiny_models.FAMILIES).

Here: each tiny config exercises its family's quirk; every site equals the tensor HF computes there;
patching sweeps and attribution patching equal torch hooks and autograd (Qwen2, GPT-NeoX); export,
masks, LoRA and the KV-cached sampler act on HF's own weights and generation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxedit
from jaxedit.edit.lora import apply_lora, init_lora, side_params
from jaxedit.localize import activation_patching as ap
from jaxedit.localize.attribution import attribution_patching
from jaxedit.localize.components import Components, trainable_mask
from jaxedit.localize.metrics import logit_diff
from jaxedit.models.decode import generate
from jaxedit.models.model import jitted_forward
from tiny_models import VOCAB, hf_forward, hf_positions, padded_batch, save_hf_model

NEW = ("qwen2", "qwen3", "mistral", "gpt_neox", "gpt_neox_sequential", "olmo2")
ANSWER, OTHERS = np.array([5, 6, 7]), np.array([[8, 9], [10, 11], [12, 13]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (HF torch model, jaxedit model, HF directory), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            built[name] = (save_hf_model(name, path), jaxedit.load(path), path)
        return built[name]

    return get


def _logits(model, cfg=None, params=None):
    """Logits [N,V] of the real tokens of the right-padded test batch."""
    ids, mask = padded_batch("right")
    logits, _ = jitted_forward(model.params if params is None else params, jnp.asarray(ids), cfg or model.cfg,
                               attention_mask=jnp.asarray(mask))
    return np.asarray(logits)[mask.astype(bool)]


QUIRKS = {  # name -> (what its config must say, the quirk switched off: must change the logits)
    "qwen2": (lambda c: c.qkv_bias and not c.out_bias and c.tie_embeddings and c.n_kv_heads < c.n_heads,
              dict(qkv_bias=False)),
    "qwen3": (lambda c: c.qk_norm == "per_head" and c.head_dim * c.n_heads != c.d_model and not c.qkv_bias,
              dict(qk_norm="")),
    "mistral": (lambda c: all(c.local_layers) and c.sliding_window < max(padded_batch("right")[1].sum(1)),
                dict(local_layers=(False,) * 3)),
    "gpt_neox": (lambda c: c.parallel_residual and c.rotary_dim == c.head_dim // 4 and c.norm == "layernorm"
                 and not c.tie_embeddings, dict(parallel_residual=False)),
    "gpt_neox_sequential": (lambda c: not c.parallel_residual and c.rotary_dim == c.head_dim // 4,
                            dict(rotary_dim=None)),
    "olmo2": (lambda c: not c.pre_norms and c.post_norms and c.qk_norm == "whole", dict(qk_norm="per_head")),
}


@pytest.mark.parametrize("name", NEW)
def test_each_tiny_config_exercises_its_quirk(tiny, name):
    _, model, _ = tiny(name)
    holds, switched_off = QUIRKS[name]
    assert model.cfg.family == name.removesuffix("_sequential") and holds(model.cfg)
    params = model.params
    if switched_off.get("qk_norm") == "per_head":  # OLMo-2's whole-projection scales, read per head instead
        attn = dict(params["layers"]["attn"], q_norm=params["layers"]["attn"]["q_norm"][:, 0],
                    k_norm=params["layers"]["attn"]["k_norm"][:, 0])
        params = dict(params, layers=dict(params["layers"], attn=attn))
    changed = _logits(model, dataclasses.replace(model.cfg, **switched_off), params)
    assert np.abs(changed - _logits(model)).max() > 1e-3


def _layers(hf):
    return hf.gpt_neox.layers if hasattr(hf, "gpt_neox") else hf.model.layers


def _first_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class HFSites:
    """Every site of one HF forward, read by hooks: `acts[site][layer]` as HF lays it out ([B,T,H*E] for
    heads; GPT-NeoX's q/k/v as its fused [B,T,H*3*E]). grad: keep their gradients (`.grad` after backward)."""

    def __init__(self, hf, ids, mask, grad=False):
        self.acts, self.grad, handles = {}, grad, []
        neox = hasattr(hf, "gpt_neox")
        for layer, block in enumerate(_layers(hf)):
            attn, mlp = (block.attention, block.mlp) if neox else (block.self_attn, block.mlp)
            hooks = {
                "resid_pre": (block, "in"), "resid_post": (block, "out"), "mlp_in": (mlp, "in"),
                "attn_z": (attn.dense if neox else attn.o_proj, "in"),
                "mlp_hidden": (mlp.dense_4h_to_h if neox else mlp.down_proj, "in"),
                "attn_in": (attn, "in"), "attn_out": (attn, "out"), "mlp_out": (mlp, "out"),
            }
            if neox:
                hooks["attn_qkv"] = (attn.query_key_value, "out")
            else:
                hooks |= {"attn_q": (attn.q_proj, "out"), "attn_k": (attn.k_proj, "out"), "attn_v": (attn.v_proj, "out")}
            if hasattr(block, "post_feedforward_layernorm"):  # OLMo-2: what is added is the post-norm's output
                hooks |= {"attn_out": (block.post_attention_layernorm, "out"),
                          "mlp_out": (block.post_feedforward_layernorm, "out")}
            for site, (module, where) in hooks.items():
                handles.append(self._hook(module, where, site, layer))
        try:
            with torch.set_grad_enabled(grad):
                self.logits = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                 position_ids=torch.as_tensor(hf_positions(mask))).logits
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, module, where, site, layer):
        def keep(t):
            if self.grad and t.requires_grad:
                t.retain_grad()
            self.acts.setdefault(site, {})[layer] = t

        if where == "in":
            return module.register_forward_pre_hook(lambda mod, args, kwargs: keep(_first_input(args, kwargs)),
                                                    with_kwargs=True)
        return module.register_forward_hook(lambda mod, args, out: keep(out[0] if isinstance(out, tuple) else out))

    def site(self, name, layer, cfg, grad=False):
        """Site `name` of `layer` (or its gradient) in jaxedit's layout ([B,T,H,E] for heads)."""
        if name == "resid_mid":
            return self.acts["resid_pre"][layer] + self.acts["attn_out"][layer]
        fused = "attn_qkv" in self.acts and name in ("attn_q", "attn_k", "attn_v")
        t = self.acts["attn_qkv" if fused else name][layer]
        t = t.grad if grad else t
        if fused:  # GPT-NeoX: [B,T,H*3*E], per head q, k, v
            return t.reshape(*t.shape[:2], cfg.n_heads, 3, cfg.head_dim)[..., "qkv".index(name[-1]), :]
        heads = {"attn_q": cfg.n_heads, "attn_z": cfg.n_heads, "attn_k": cfg.n_kv_heads, "attn_v": cfg.n_kv_heads}
        return t.reshape(*t.shape[:2], heads[name], -1) if name in heads else t


@pytest.mark.parametrize("name", ["qwen2", "gpt_neox", "gpt_neox_sequential", "olmo2"])
def test_every_site_equals_the_tensor_hf_computes(tiny, name):
    """The README's site table: GPT-NeoX's resid_mid is resid_pre + attn_out (parallel: the MLP reads resid_pre,
    mlp_in = its norm); OLMo-2's attn_in is resid_pre (no pre-norm) and attn_out/mlp_out are post-norm outputs."""
    hf, model, _ = tiny(name)
    ids, mask = padded_batch("left")
    sites = ("resid_pre", "attn_in", "attn_q", "attn_k", "attn_v", "attn_z", "attn_out", "resid_mid", "mlp_in",
             "mlp_hidden", "mlp_out", "resid_post")
    _, cache = model.forward(ids, attention_mask=mask, capture=sites)
    ref = HFSites(hf, ids, mask)
    real = mask.astype(bool)
    for site in sites:
        for layer in range(model.cfg.n_layers):
            theirs = ref.site(site, layer, model.cfg).numpy()
            ours = np.asarray(cache[site][layer])
            assert ours.shape == theirs.shape, site
            assert np.abs(ours - theirs)[real].max() <= 1e-4 * max(1.0, np.abs(theirs[real]).max()), (site, layer)


def _pair_batch():
    clean, mask = padded_batch("left", lengths=(8, 5, 3), seed=0)
    corrupt = np.where(mask.astype(bool), (clean * 7 + 3) % (VOCAB - 3) + 3, 0)
    return clean, corrupt, mask


def _hf_metric(hf, tokens, mask, module=None, replace=None):
    """logit_diff [B] of HF at the last (left-padded) position, with a forward pre-hook rewriting `module`'s input."""
    handle = None if module is None else module.register_forward_pre_hook(
        lambda mod, args: (replace(args[0].clone()),) + args[1:])
    try:
        logits = hf_forward(hf, tokens, mask).logits[:, -1]
    finally:
        if handle is not None:
            handle.remove()
    return np.asarray(logit_diff(jnp.asarray(logits.numpy()), ANSWER, OTHERS))


def _put(cols, value):
    def replace(x):
        x[cols] = value[cols]
        return x
    return replace


@pytest.mark.parametrize("name", ["qwen2", "gpt_neox"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_residual_and_head_sweeps_equal_torch_hooks(tiny, name, direction):
    hf, model, _ = tiny(name)
    cfg = model.cfg
    clean, corrupt, mask = _pair_batch()
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    src = HFSites(hf, source, mask)
    layers = _layers(hf)
    out_proj = [(block.attention.dense if name == "gpt_neox" else block.self_attn.o_proj) for block in layers]

    resid = np.array([[_hf_metric(hf, target, mask, layers[layer], _put((slice(None), pos), src.acts["resid_pre"][layer]))
                       for pos in range(clean.shape[1])] for layer in range(cfg.n_layers)])
    heads = np.array([[_hf_metric(hf, target, mask, out_proj[layer],
                                  _put((Ellipsis, slice(h * cfg.head_dim, (h + 1) * cfg.head_dim)), src.acts["attn_z"][layer]))
                       for h in range(cfg.n_heads)] for layer in range(cfg.n_layers)])
    kw = dict(metric=logit_diff, metric_args=(ANSWER, OTHERS), direction=direction)
    ours_resid = ap.patching_sweep(model.params, cfg, clean, corrupt, mask, site="resid_pre", chunk_size=8, **kw)
    ours_heads = ap.patching_sweep(model.params, cfg, clean, corrupt, mask, site="attn_z", chunk_size=4, **kw)
    assert ours_resid.axes == ("layer", "pos") and ours_heads.axes == ("layer", "head")
    assert np.abs(ours_resid.per_example - resid).max() <= 1e-4
    assert np.abs(ours_heads.per_example - heads).max() <= 1e-4
    assert np.ptp(ours_resid.scores) > 1e-2 and np.ptp(ours_heads.scores) > 1e-3  # the patches do something


ATP_SITES = ("attn_q", "attn_k", "attn_v", "attn_z", "mlp_in", "mlp_out", "mlp_hidden", "resid_pre")
# the axes a site's score sums over ([B,T,heads,E] -> per head, [B,T,F] -> per neuron, [B,T,D] -> per position)
SUMMED_AXES = {"attn_q": (0, 1, 3), "attn_k": (0, 1, 3), "attn_v": (0, 1, 3), "attn_z": (0, 1, 3), "mlp_hidden": (0, 1),
             "resid_pre": (0, 2)}


def _torch_atp(hf, cfg, clean, corrupt, mask, answer, others):
    """Σ (corrupt − clean)·∂M/∂act per site, normalized by M(clean) − M(corrupt), by torch autograd on HF."""
    def metric(logits):
        last = logits[:, -1]
        rows = torch.arange(len(answer))
        return (last[rows, torch.as_tensor(answer)] - last[rows[:, None], torch.as_tensor(others)].mean(-1)).mean()

    bad = HFSites(hf, corrupt, mask)
    run = HFSites(hf, clean, mask, grad=True)
    m = metric(run.logits)
    m.backward()
    denominator = m.item() - metric(bad.logits).item()
    out = {}
    for site in ATP_SITES:
        rows = []
        for layer in range(cfg.n_layers):
            delta = bad.site(site, layer, cfg) - run.site(site, layer, cfg)
            product = (delta * run.site(site, layer, cfg, grad=True)).detach()
            rows.append(product.sum(SUMMED_AXES.get(site, tuple(range(product.ndim)))))
        out[site] = torch.stack(rows).numpy() / denominator
    return out


@pytest.mark.parametrize("name", ["qwen2", "gpt_neox"])
def test_attribution_patching_equals_torch_autograd(tiny, name):
    hf, model, _ = tiny(name)
    clean, corrupt, mask = _pair_batch()
    answer = hf_forward(hf, clean, mask).logits[:, -1].argmax(-1).numpy()  # what the model predicts
    others = OTHERS
    result = attribution_patching(model.params, model.cfg, clean, corrupt, mask, (answer, others), sites=ATP_SITES,
                                  chunk=2)
    ref = _torch_atp(hf, model.cfg, clean, corrupt, mask, answer, others)
    for site in ATP_SITES:
        assert np.abs(ref[site]).max() > 1e-4, site
        scale = np.abs(ref[site]).max()
        np.testing.assert_allclose(result.scores[site], ref[site], rtol=1e-4, atol=2e-5 * scale, err_msg=site)


@pytest.mark.parametrize("name", NEW)
def test_export_writes_the_hf_checkpoint_back(tiny, name, tmp_path):
    """Unedited: every tensor of HF's own save, bit for bit (GPT-NeoX's fused q/k/v re-interleaved per head);
    edited: HF loads it and computes our logits."""
    _, model, source = tiny(name)
    out = jaxedit.export_hf(model, tmp_path / "same")
    ours, theirs = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    edited = jax.tree.map(lambda a: a * 1.01, model.params)
    out = jaxedit.export_hf(model, tmp_path / "edited", params=edited)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids, mask = padded_batch("right")
    assert np.abs(hf_forward(hf.eval(), ids, mask).logits.numpy()[mask.astype(bool)] - _logits(model, params=edited)).max() <= 1e-4


def test_head_and_neuron_masks_select_gpt_neox_rows(tiny, tmp_path):
    """A head's mask reaches exactly its q, k, v rows of the fused query_key_value and its columns of dense;
    a neuron's, its row of dense_h_to_4h and column of dense_4h_to_h (HF's layout, read from the export)."""
    _, model, source = tiny("gpt_neox")
    cfg = model.cfg
    layer, head, neuron = 1, 1, 5
    mask = trainable_mask(Components.make(["head", "neuron"], [layer, 2], [head, neuron]), cfg)
    edited = jax.tree.map(lambda p, m: p + m, model.params, mask)
    ours = load_file(jaxedit.export_hf(model, tmp_path / "masked", params=edited) / "model.safetensors")
    before = load_file(source / "model.safetensors")
    changed = {k: np.argwhere(ours[k] != before[k]) for k in before if not np.array_equal(ours[k], before[k])}
    e = cfg.head_dim
    qkv, dense = f"gpt_neox.layers.{layer}.attention.query_key_value.weight", f"gpt_neox.layers.{layer}.attention.dense.weight"
    up, down = "gpt_neox.layers.2.mlp.dense_h_to_4h.weight", "gpt_neox.layers.2.mlp.dense_4h_to_h.weight"
    assert sorted(changed) == sorted([qkv, dense, up, down])
    assert set(changed[qkv][:, 0]) == set(range(head * 3 * e, (head + 1) * 3 * e))  # rows [H, 3, E]: this head's q, k, v
    assert set(changed[dense][:, 1]) == set(range(head * e, (head + 1) * e))
    assert set(changed[up][:, 0]) == {neuron} and set(changed[down][:, 1]) == {neuron}


def test_lora_side_path_equals_hf_with_the_merged_weights(tiny, tmp_path):
    """GPT-NeoX: adapters on its un-gated MLP and on q, k, v that HF stores fused."""
    _, model, _ = tiny("gpt_neox")
    adapters = init_lora(model.params, 4, jax.random.key(1))
    adapters = {k: dict(v, b=jax.random.normal(jax.random.key(2), v["b"].shape) * 0.1) for k, v in adapters.items()}
    assert sorted(adapters) == ["w_down", "w_up", "wk", "wo", "wq", "wv"]
    side = _logits(model, params=side_params(model.params, adapters, 8.0, 4))
    out = jaxedit.export_hf(model, tmp_path / "merged", params=apply_lora(model.params, adapters, 8.0, 4))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids, mask = padded_batch("right")
    assert np.abs(hf_forward(hf.eval(), ids, mask).logits.numpy()[mask.astype(bool)] - side).max() <= 1e-4
    assert np.abs(side - _logits(model)).max() > 1e-2  # the adapters do something


@pytest.mark.parametrize("name", ["mistral", "gpt_neox", "olmo2"])  # sliding window, partial RoPE, no pre-norm
def test_kv_cached_greedy_sampling_equals_hf_generate(tiny, name):
    hf, model, _ = tiny(name)
    prefix = [5, 17, 33, 8]
    buffer = np.zeros((1, 12), np.int32)
    buffer[0, :len(prefix)] = prefix
    got, _ = generate(model.params, buffer, len(prefix), jax.random.split(jax.random.key(0), 1),
                      jnp.asarray([-1], jnp.int32), 0, model.cfg, 0.0)
    with torch.no_grad():
        want = hf.generate(torch.as_tensor([prefix]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           attention_mask=torch.ones(1, len(prefix), dtype=torch.long))
    np.testing.assert_array_equal(np.asarray(got)[0], want[0].numpy())
