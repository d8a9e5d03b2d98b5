"""Activation-patching sweeps against a loop of single patched forwards and against torch hooks on HF."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit.interventions import one_layer_edit
from jaxedit.localize import activation_patching as ap
from jaxedit.localize.corruptions import PromptPairs
from jaxedit.localize.metrics import logit_diff
from jaxedit.models import core
from tiny_models import VOCAB, hf_forward, padded_batch, save_hf_model

ANSWER = np.array([5, 6, 7])
OTHERS = np.array([[8, 9], [10, 11], [12, 13]])


def _pair_batch(padding_side="left", lengths=(8, 5, 3)):
    """Padded clean tokens, aligned corrupt tokens (every real token replaced), mask: [3,max(lengths)]."""
    clean, mask = padded_batch(padding_side, lengths=lengths, seed=0)
    corrupt = np.where(mask.astype(bool), (clean * 7 + 3) % (VOCAB - 3) + 3, 0)
    return clean, corrupt, mask


@pytest.fixture(scope="module", params=["llama3_gqa", "gemma3"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return save_hf_model(request.param, path), jaxedit.load(path)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3_loop")
    save_hf_model("gemma3", path, seed=1)
    return jaxedit.load(path)


def _sweep(model, site, direction, batch=(), **kw):
    clean, corrupt, mask = _pair_batch(*batch)
    return ap.patching_sweep(model.params, model.cfg, clean, corrupt, mask, metric=logit_diff,
                             metric_args=(ANSWER, OTHERS), site=site, direction=direction, **kw)


@functools.partial(jax.jit, static_argnames="cfg")
def _patched_forward(params, tokens, mask, layer, wheres, values, cfg):
    """Metric [B] of one forward with `one_layer_edit`s of every site in `wheres` (all but one all-False)."""
    edits = {}
    for site, where in wheres.items():
        edits |= one_layer_edit(site, layer, cfg.n_layers, where, values[site][layer])
    last = core.last_positions(mask)
    logits, _ = core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=last, edits=edits)
    return logit_diff(logits[:, 0], ANSWER, OTHERS)


def _loop_reference(model, site, direction, unit_axis, by_position, batch=()):
    """Per-example metric [L, U?, T?, B] from one patched `core.forward` per site (a Python loop)."""
    cfg, params = model.cfg, model.params
    clean, corrupt, mask = (jnp.asarray(a) for a in _pair_batch(*batch))
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, values = model.forward(source, attention_mask=mask, capture=tuple(ap.UNIT_AXIS))
    no_patch = {name: np.zeros((1,) + v.shape[2:], bool) for name, v in values.items()}
    n_units = values[site].shape[3] if unit_axis else 1
    positions = range(target.shape[1]) if by_position else [slice(None)]
    out = np.zeros((cfg.n_layers, n_units, len(positions), target.shape[0]), np.float32)
    for layer in range(cfg.n_layers):
        for u in range(n_units):
            for j, pos in enumerate(positions):
                where = np.zeros_like(no_patch[site])
                if unit_axis:
                    where[0, pos, u] = True
                else:
                    where[0, pos] = True
                out[layer, u, j] = _patched_forward(params, target, mask, layer, no_patch | {site: where}, values, cfg)
    shape = (cfg.n_layers,) + ((n_units,) if unit_axis else ()) + ((len(positions),) if by_position else ()) + (-1,)
    return out.reshape(shape)


KINDS = [  # site, by_position, direction, chunk_size, expected axes
    ("resid_pre", True, "denoise", 8, ("layer", "pos")),
    ("resid_mid", True, "noise", 8, ("layer", "pos")),
    ("resid_post", True, "denoise", 8, ("layer", "pos")),
    ("attn_z", False, "noise", 4, ("layer", "head")),
    ("attn_z", True, "denoise", 32, ("layer", "head", "pos")),
    ("attn_out", False, "noise", 4, ("layer",)),
    ("mlp_out", False, "denoise", 4, ("layer",)),
    ("mlp_out", True, "noise", 8, ("layer", "pos")),
    ("mlp_hidden", False, "denoise", 20, ("layer", "neuron")),  # 48 neurons: two chunks and a remainder
]


@pytest.mark.parametrize("site,by_position,direction,chunk,axes", KINDS)
def test_sweep_equals_loop_of_single_patched_forwards(gemma3, site, by_position, direction, chunk, axes):
    result = _sweep(gemma3, site, direction, by_position=by_position, chunk_size=chunk)
    ref = _loop_reference(gemma3, site, direction, ap.UNIT_AXIS[site], by_position)
    assert result.axes == axes and result.per_example.shape == ref.shape
    assert np.abs(result.per_example - ref).max() <= 1e-5
    np.testing.assert_allclose(result.scores, ref.mean(-1), atol=1e-5)
    assert np.ptp(result.scores) > 1e-2  # the patches do something


@pytest.mark.parametrize("site,direction,lengths", [("resid_pre", "denoise", (11, 6, 3)), ("attn_z", "noise", (10, 7, 2)),
                                                    ("mlp_out", "denoise", (11, 6, 3))])
def test_packed_position_pairs_skip_earlier_positions_exactly(gemma3, site, direction, lengths):
    """Right padding (prompts ending before a patch), odd and even T, sliding-window layers reading the
    target's cached keys across the packed suffixes: still the loop of full patched forwards."""
    batch = ("right", lengths)
    result = _sweep(gemma3, site, direction, batch, by_position=True, chunk_size=5)
    ref = _loop_reference(gemma3, site, direction, ap.UNIT_AXIS[site], True, batch)
    assert np.abs(result.per_example - ref).max() <= 1e-5
    assert np.ptp(result.scores) > 1e-2


def test_prefix_reuse_off_agrees(gemma3):
    reuse = _sweep(gemma3, "resid_pre", "noise", chunk_size=8)
    full = _sweep(gemma3, "resid_pre", "noise", chunk_size=8, prefix_reuse=False)
    assert np.abs(reuse.per_example - full.per_example).max() <= 1e-5


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_the_last_residual_recovers_the_source_run(gemma3, direction):
    """resid_post of the last layer at the last position is all the logits see: the source's metric, exactly."""
    clean, corrupt, mask = _pair_batch()
    pairs = PromptPairs(clean, corrupt, mask, np.zeros_like(mask, bool))
    result = ap.patching_sweep(gemma3.params, gemma3.cfg, pairs, metric=logit_diff, metric_args=(ANSWER, OTHERS),
                               site="resid_post", direction=direction, chunk_size=8)
    source = result.clean if direction == "denoise" else result.corrupt
    np.testing.assert_allclose(result.per_example[-1, -1], source, atol=1e-5)
    np.testing.assert_allclose(result.normalized()[-1, -1], 1.0 if direction == "denoise" else 0.0, atol=1e-5)
    assert np.abs(result.normalized()[:-1, -1] - result.normalized()[-1, -1]).max() > 1e-2  # earlier layers differ


def test_one_compile_serves_new_data_of_the_same_shapes(gemma3):
    clean, corrupt, mask = _pair_batch()
    kw = dict(metric=logit_diff, site="mlp_out", chunk_size=4)
    ap.patching_sweep(gemma3.params, gemma3.cfg, clean, corrupt, mask, metric_args=(ANSWER, OTHERS), **kw)
    before = ap._sweep._cache_size()
    ap.patching_sweep(gemma3.params, gemma3.cfg, corrupt, clean, mask, metric_args=(ANSWER[::-1], OTHERS[::-1]),
                      direction="noise", **kw)
    assert ap._sweep._cache_size() == before


def _hf_metric(logits):
    last = torch.as_tensor(logits)[:, -1]  # left padding: the last real token is the last position
    return logit_diff(jnp.asarray(last.numpy()), ANSWER, OTHERS)


def _hook_loop(hf, module_of, target, mask, replacements):
    """[sites, B] metric of the HF model with each replacement applied through a forward pre-hook."""
    out = []
    for layer, replace in replacements:
        handle = module_of(layer).register_forward_pre_hook(lambda mod, args: (replace(args[0].clone()),) + args[1:])
        try:
            out.append(_hf_metric(hf_forward(hf, target, mask).logits))
        finally:
            handle.remove()
    return np.stack(out)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_resid_sweep_matches_torch_hooks(pair, direction):
    hf, model = pair
    clean, corrupt, mask = _pair_batch()
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    hidden = hf_forward(hf, source, mask, output_hidden_states=True).hidden_states
    n_layers, t = model.cfg.n_layers, clean.shape[1]

    def patch(layer, pos):
        def replace(h):
            h[:, pos] = hidden[layer][:, pos]
            return h
        return layer, replace

    sites = [patch(layer, pos) for layer in range(n_layers) for pos in range(t)]
    ref = _hook_loop(hf, lambda layer: hf.model.layers[layer], target, mask, sites).reshape(n_layers, t, -1)
    result = _sweep(model, "resid_pre", direction, chunk_size=8)
    assert np.abs(result.per_example - ref).max() <= 1e-4
    np.testing.assert_allclose(result.clean, _hf_metric(hf_forward(hf, clean, mask).logits), atol=1e-4)
    np.testing.assert_allclose(result.corrupt, _hf_metric(hf_forward(hf, corrupt, mask).logits), atol=1e-4)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_head_sweep_matches_torch_hooks(pair, direction):
    hf, model = pair
    cfg = model.cfg
    clean, corrupt, mask = _pair_batch()
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    o_proj = lambda layer: hf.model.layers[layer].self_attn.o_proj  # noqa: E731
    z = {}
    handles = [o_proj(layer).register_forward_pre_hook(lambda mod, args, i=layer: z.__setitem__(i, args[0].clone()))
               for layer in range(cfg.n_layers)]
    hf_forward(hf, source, mask)
    for handle in handles:
        handle.remove()

    def patch(layer, head):
        cols = slice(head * cfg.head_dim, (head + 1) * cfg.head_dim)

        def replace(x):
            x[..., cols] = z[layer][..., cols]
            return x
        return layer, replace

    sites = [patch(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    ref = _hook_loop(hf, o_proj, target, mask, sites).reshape(cfg.n_layers, cfg.n_heads, -1)
    result = _sweep(model, "attn_z", direction, chunk_size=4)
    assert result.axes == ("layer", "head")
    assert np.abs(result.per_example - ref).max() <= 1e-4


@pytest.mark.parametrize("kwargs,message", [
    (dict(site="attn_q"), "cannot sweep site"),
    (dict(direction="sideways"), "unknown direction"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(metric=lambda logits, *args: logits[:, :2]), "metric returned shape"),
])
def test_bad_input_fails_with_one_clear_line(gemma3, kwargs, message):
    clean, corrupt, mask = _pair_batch()
    args = dict(metric=logit_diff, metric_args=(ANSWER, OTHERS)) | kwargs
    with pytest.raises(jaxedit.JaxeditError, match=message):
        ap.patching_sweep(gemma3.params, gemma3.cfg, clean, corrupt, mask, **args)
    with pytest.raises(jaxedit.JaxeditError, match="must all be"):
        ap.patching_sweep(gemma3.params, gemma3.cfg, clean, corrupt[:, 1:], mask, metric=logit_diff)
