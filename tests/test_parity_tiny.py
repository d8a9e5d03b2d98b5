"""Logit and hidden-state parity with HF transformers (torch, float32) on tiny random models."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit.models import core
from tiny_models import FAMILIES, hf_forward, padded_batch, save_hf_model


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(HF torch model, jaxedit model) with the same weights."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, path)
    return hf, jaxedit.load(path)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_and_hidden_states_match_hf(pair, side):
    hf, model = pair
    ids, mask = padded_batch(side)
    ref = hf_forward(hf, ids, mask, output_hidden_states=True)
    logits, cache = model.forward(ids, attention_mask=mask, capture=("embed", "resid_pre", "resid_post"))
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits) - ref.logits.numpy())[real].max() <= 1e-4
    hidden = [h.numpy() for h in ref.hidden_states]
    ours = list(np.asarray(cache["resid_pre"])) + [np.asarray(core.unembed_norm(model.cfg, model.params, cache["resid_post"][-1]))]
    assert len(hidden) == len(ours) == model.cfg.n_layers + 1
    np.testing.assert_allclose(np.asarray(cache["embed"])[real], hidden[0][real], atol=1e-5)
    for layer, (h_ref, h_ours) in enumerate(zip(hidden, ours)):
        assert np.abs(h_ours - h_ref)[real].max() <= 1e-4, f"hidden state {layer}"


def test_logits_at_chosen_positions_equal_full_logits(pair):
    _, model = pair
    ids, mask = padded_batch("right")
    full, _ = model.forward(ids, attention_mask=mask)
    last = core.last_positions(mask)
    picked, _ = model.forward(ids, attention_mask=mask, logit_positions=last)
    expected = np.take_along_axis(np.asarray(full), np.asarray(last)[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(picked), expected, atol=1e-6)


def test_bfloat16_forward_tracks_hf_bfloat16(pair, tmp_path):
    hf, model = pair
    ids, mask = padded_batch("right")
    source = model.source
    bf16 = jaxedit.load(source, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(bf16.params))
    ours, _ = bf16.forward(ids, attention_mask=mask)
    assert ours.dtype == jnp.bfloat16
    ref = hf_forward(copy.deepcopy(hf).to(torch.bfloat16), ids, mask).logits.float().numpy()
    full = hf_forward(hf, ids, mask).logits.numpy()
    real = mask.astype(bool)
    ours = np.asarray(ours, np.float32)
    # bfloat16 keeps 8 mantissa bits: both implementations sit within bf16 rounding of the float32 answer
    scale = np.abs(full[real]).max()
    assert np.abs(ours - full)[real].max() <= 0.05 * scale
    assert np.abs(ours - ref)[real].max() <= 0.05 * scale
