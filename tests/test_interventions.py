"""Edits as data: no-op masks, patching against torch hooks, gradients against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxedit
from jaxedit import SiteEdit
from jaxedit.interventions import one_layer_edit
from jaxedit.models import core
from tiny_models import hf_forward, padded_batch, save_hf_model


@pytest.fixture(scope="module", params=["llama3_gqa", "gemma3"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return save_hf_model(request.param, path), jaxedit.load(path)


def test_all_false_mask_edit_is_bit_identical_to_no_edit(pair):
    _, model = pair
    ids, mask = padded_batch("right")
    plain, plain_cache = model.forward(ids, attention_mask=mask, capture=("resid_post",))
    cfg = model.cfg
    sizes = {"resid_pre": (1, 3, 9, 32), "attn_z": (1, 3, 9, 4, cfg.head_dim), "mlp_hidden": (1, 3, 9, 48),
             "embed": (3, 9, 32)}
    edits = {name: SiteEdit(mask=jnp.zeros((1,) * len(shape), bool), value=jnp.full(shape, 7.0))
             for name, shape in sizes.items()}
    edited, edited_cache = model.forward(ids, attention_mask=mask, edits=edits, capture=("resid_post",))
    assert np.array_equal(np.asarray(plain), np.asarray(edited))
    assert np.array_equal(np.asarray(plain_cache["resid_post"]), np.asarray(edited_cache["resid_post"]))


def _torch_patch(hf, module, ids, mask, replace):
    """HF logits with `replace(tensor)` applied to the input of `module` through a forward pre-hook."""
    handle = module.register_forward_pre_hook(lambda mod, args: (replace(args[0].clone()),) + args[1:])
    try:
        return hf_forward(hf, ids, mask).logits.numpy()
    finally:
        handle.remove()


def test_resid_patch_from_another_prompt_matches_torch_hook(pair):
    hf, model = pair
    ids, mask = padded_batch("right", lengths=(7, 7), seed=1)
    source_ids, _ = padded_batch("right", lengths=(7, 7), seed=2)
    layer, pos = 2, 3
    _, source_cache = model.forward(source_ids, attention_mask=mask, capture=("resid_pre",))
    value = source_cache["resid_pre"][layer]
    where = jnp.zeros((2, 7, 1), bool).at[:, pos].set(True)
    ours, _ = model.forward(ids, attention_mask=mask, edits=one_layer_edit("resid_pre", layer, model.cfg.n_layers, where, value))

    source_hidden = hf_forward(hf, source_ids, mask, output_hidden_states=True).hidden_states[layer]

    def replace(h):
        h[:, pos] = source_hidden[:, pos]
        return h

    ref = _torch_patch(hf, hf.model.layers[layer], ids, mask, replace)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    unpatched = hf_forward(hf, ids, mask).logits.numpy()
    assert np.abs(ref - unpatched)[:, pos:].max() > 1e-2  # the patch does something


def test_head_patch_from_another_prompt_matches_torch_hook(pair):
    hf, model = pair
    cfg = model.cfg
    ids, mask = padded_batch("left", lengths=(8, 5), seed=3)
    source_ids, _ = padded_batch("left", lengths=(8, 5), seed=4)
    layer, head = 1, 2
    _, source_cache = model.forward(source_ids, attention_mask=mask, capture=("attn_z",))
    head_mask = jnp.zeros((1, 1, cfg.n_heads, 1), bool).at[..., head, :].set(True)
    edits = one_layer_edit("attn_z", layer, cfg.n_layers, head_mask, source_cache["attn_z"][layer])
    ours, _ = model.forward(ids, attention_mask=mask, edits=edits)

    captured = {}
    o_proj = hf.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda mod, args: captured.__setitem__("z", args[0].clone()))
    hf_forward(hf, source_ids, mask)
    handle.remove()
    cols = slice(head * cfg.head_dim, (head + 1) * cfg.head_dim)

    def replace(z):
        z[..., cols] = captured["z"][..., cols]
        return z

    ref = _torch_patch(hf, o_proj, ids, mask, replace)
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours) - ref)[real].max() <= 1e-4


@pytest.mark.parametrize("site", ["resid_mid", "attn_z", "mlp_hidden", "embed"])
def test_gradient_wrt_zero_delta_equals_finite_difference(pair, site):
    _, model = pair
    ids, mask = padded_batch("right", lengths=(6, 4))
    last = core.last_positions(jnp.asarray(mask))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.params)
        _, cache = core.forward(params, jnp.asarray(ids), model.cfg, attention_mask=jnp.asarray(mask), capture=(site,))
        shape = cache[site].shape

        def metric(delta):
            logits, _ = core.forward(params, jnp.asarray(ids), model.cfg, attention_mask=jnp.asarray(mask),
                                     logit_positions=last, edits={site: SiteEdit(delta=delta)})
            return logits[:, 0, 5].sum() - logits[:, 0, 7].sum()

        zero = jnp.zeros(shape, jnp.float64)
        grad = jax.grad(metric)(zero)
        direction = jax.random.normal(jax.random.key(0), shape, jnp.float64)
        eps = 1e-5
        fd = (metric(eps * direction) - metric(-eps * direction)) / (2 * eps)
        analytic = jnp.vdot(grad, direction)
        assert abs(float(analytic - fd)) <= 1e-6 * max(1.0, abs(float(fd)))
        assert float(jnp.abs(grad).max()) > 0


def test_vmap_over_edits_equals_separate_calls(pair):
    _, model = pair
    cfg = model.cfg
    ids, mask = padded_batch("right", lengths=(6, 6))
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    _, cache = model.forward(ids, attention_mask=mask, capture=("resid_pre",))
    corrupt = cache["resid_pre"][:, ::-1]  # the other prompt's residuals

    def patched(layer):
        edits = one_layer_edit("resid_pre", layer, cfg.n_layers, jnp.ones((2, 6, 1), bool), corrupt[layer])
        return core.forward(model.params, ids, cfg, attention_mask=mask, edits=edits,
                            logit_positions=core.last_positions(mask))[0]

    batched = jax.jit(jax.vmap(patched))(jnp.arange(cfg.n_layers))
    for layer in range(cfg.n_layers):
        np.testing.assert_allclose(np.asarray(batched[layer]), np.asarray(patched(layer)), atol=1e-5)


def test_run_from_a_traced_layer_equals_the_full_forward(pair):
    _, model = pair
    cfg = model.cfg
    ids, mask = padded_batch("left", lengths=(7, 4))
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    full, cache = model.forward(ids, attention_mask=mask, capture=("resid_pre", "resid_post"))
    ctx = core.make_context(cfg, mask)
    suffix = jax.jit(lambda start: core.run_from(cfg, model.params, cache["resid_pre"][start], ctx, start))
    for start in range(cfg.n_layers):
        np.testing.assert_allclose(np.asarray(suffix(start)), np.asarray(cache["resid_post"][-1]), atol=1e-5)
