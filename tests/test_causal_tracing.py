"""Causal tracing: reproducible noise, full restores recover the clean run, sweeps equal loops of forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxedit
from jaxedit import SiteEdit
from jaxedit.errors import JaxeditError
from jaxedit.interventions import one_layer_edit
from jaxedit.localize import corruptions, metrics
from jaxedit.localize.causal_tracing import trace_components, trace_grid, trace_restore
from jaxedit.models import core
from tiny_models import padded_batch, save_hf_model

SAMPLES = 3
KEY = 2  # a key whose noise moves every prompt's answer probability by > 0.05


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    save_hf_model("gemma3", path)
    model = jaxedit.load(path)
    tokens, mask = padded_batch("left", lengths=(8, 6, 7), seed=11)
    t = tokens.shape[1]
    subject = np.zeros(tokens.shape, bool)
    subject[:, t - 3:t - 1] = True  # a two-token subject just before the last token
    logits, _ = model.forward(tokens, attention_mask=mask, logit_positions=core.last_positions(jnp.asarray(mask)))
    candidates = np.asarray(jnp.argsort(-logits[:, 0], axis=-1)[:, :4])  # the model's top 4
    answer = candidates[:, 0]
    return model, (tokens, mask, subject, answer, candidates)


def _kwargs(data, **extra):
    tokens, mask, subject, answer, candidates = data
    return dict(tokens=tokens, attention_mask=mask, subject=subject, answer=answer, candidates=candidates,
                samples=SAMPLES, **extra)


def reference_nie(model, data, key, scale, restores):
    """NIE per example [len(restores), B] from a Python loop of single restored forwards.

    restores: list of {site: SiteEdit mask/value} edits (built with one_layer_edit or by hand).
    """
    tokens, mask, subject, answer, candidates = data
    last = core.last_positions(jnp.asarray(mask))
    noise = corruptions.subject_noise(key, jnp.asarray(subject), model.cfg.d_model, scale, SAMPLES)

    def prob(edits):
        logits, _ = model.forward(tokens, attention_mask=mask, logit_positions=last, edits=edits)
        return np.asarray(metrics.answer_prob(logits[:, 0], jnp.asarray(answer), jnp.asarray(candidates)))

    def noised_prob(restore):
        return np.mean([prob({"embed": SiteEdit(delta=noise[s]), **restore}) for s in range(SAMPLES)], axis=0)

    p_clean, p_corrupt = prob({}), noised_prob({})
    assert np.abs(p_clean - p_corrupt).min() > 0.03  # the noise matters for every prompt
    return np.stack([(noised_prob(r) - p_corrupt) / (p_clean - p_corrupt) for r in restores])


def test_fixed_key_is_bit_identical_and_the_key_matters(setup):
    model, data = setup
    first = trace_components(model.params, model.cfg, key=jax.random.key(KEY), **_kwargs(data))
    again = trace_components(model.params, model.cfg, key=jax.random.key(KEY), **_kwargs(data))
    other = trace_components(model.params, model.cfg, key=jax.random.key(KEY + 1), **_kwargs(data))
    for site in ("attn_z", "mlp_out"):
        assert np.array_equal(first.per_example[site], again.per_example[site])
        assert not np.array_equal(first.per_example[site], other.per_example[site])
    assert first.nie["attn_z"].shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert first.axes["mlp_out"] == ("layer",)


def test_restoring_every_site_recovers_the_clean_metric(setup):
    model, data = setup
    n_layers = model.cfg.n_layers
    # sets: resid_pre at layer 0, every position | every mlp_out and attn_z | nothing
    resid = np.zeros((1, 3, n_layers, 1, 1, 1), bool)
    resid[0, 0, 0] = True
    mlp = np.zeros((1, 3, n_layers, 1, 1, 1), bool)
    mlp[0, 1] = True
    heads = np.zeros((1, 3, n_layers, 1, 1, 1, 1), bool)
    heads[0, 1] = True
    restore = {"resid_pre": resid, "mlp_out": mlp, "attn_z": heads}
    result = trace_restore(model.params, model.cfg, key=jax.random.key(KEY), restore=restore, **_kwargs(data))
    per = result.per_example["restore"][0]  # [3, B]
    assert np.abs(per[:2] - 1).max() <= 1e-5
    assert np.abs(per[2]).max() <= 1e-5  # nothing restored: the suffix recomputed from the noised prefix
    assert np.abs(result.p_clean - result.p_corrupt).min() > 0.05


def test_component_sweep_equals_loop_of_one_layer_edits(setup):
    model, data = setup
    cfg = model.cfg
    key = jax.random.key(KEY)
    result = trace_components(model.params, cfg, key=key, **_kwargs(data))
    tokens, mask = data[0], data[1]
    _, clean = model.forward(tokens, attention_mask=mask, capture=("attn_z", "mlp_out"))
    restores = []
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            head_mask = (np.arange(cfg.n_heads) == head)[None, None, :, None]
            restores.append(one_layer_edit("attn_z", layer, cfg.n_layers, head_mask, clean["attn_z"][layer]))
        everywhere = np.ones((1, 1, 1), bool)
        restores.append(one_layer_edit("mlp_out", layer, cfg.n_layers, everywhere, clean["mlp_out"][layer]))
    ref = reference_nie(model, data, key, result.noise_scale, restores).reshape(cfg.n_layers, cfg.n_heads + 1, -1)
    assert np.abs(result.per_example["attn_z"] - ref[:, :-1]).max() <= 1e-5
    assert np.abs(result.per_example["mlp_out"] - ref[:, -1]).max() <= 1e-5
    np.testing.assert_allclose(result.nie["mlp_out"], ref[:, -1].mean(-1), atol=1e-5)
    assert np.abs(ref).max() > 0.05  # some component matters


@pytest.mark.parametrize("site, window, chunk", [("resid_pre", 1, None), ("mlp_out", 3, 4)])
def test_grid_equals_loop_of_windowed_restores(setup, site, window, chunk):
    model, data = setup
    cfg = model.cfg
    tokens, mask = data[0], data[1]
    t = tokens.shape[1]
    key = jax.random.key(KEY)
    result = trace_grid(model.params, cfg, key=key, site=site, window=window, noise="paper", chunk=chunk,
                        **_kwargs(data))
    table = np.asarray(model.params["embed"]["tokens"], np.float64) * cfg.embed_scale  # the paper's: per example
    scale = np.array([np.sqrt(3 * table[row[hit]].std()) for row, hit in zip(tokens, data[2])], np.float32)
    np.testing.assert_allclose(result.noise_scale, scale, rtol=1e-5)
    _, clean = model.forward(tokens, attention_mask=mask, capture=(site,))
    restores = []
    for layer in range(cfg.n_layers):
        for pos in range(t):
            if window == 1:
                where = (np.arange(t) == pos)[None, :, None]
                restores.append(one_layer_edit(site, layer, cfg.n_layers, where, clean[site][layer]))
            else:  # ROME's centred window of layers
                lo, hi = max(0, layer - window // 2), min(cfg.n_layers, layer + (window + 1) // 2)
                layers = (np.arange(cfg.n_layers) >= lo) & (np.arange(cfg.n_layers) < hi)
                where = layers[:, None, None, None] & (np.arange(t) == pos)[None, None, :, None]
                restores.append({site: SiteEdit(mask=where, value=clean[site])})
    ref = reference_nie(model, data, key, scale, restores).reshape(cfg.n_layers, t, -1)
    assert result.per_example[site].shape == (cfg.n_layers, t, len(tokens))
    assert np.abs(result.per_example[site] - ref).max() <= 1e-5
    assert np.abs(ref).max() > 0.05


def test_bad_input_fails_with_one_line(setup):
    model, data = setup
    kwargs = _kwargs(data)
    kwargs["subject"] = np.zeros_like(data[2])
    with pytest.raises(JaxeditError, match="subject token"):
        trace_components(model.params, model.cfg, key=jax.random.key(0), **kwargs)
    with pytest.raises(JaxeditError, match="window"):
        trace_grid(model.params, model.cfg, key=jax.random.key(0), window=0, **_kwargs(data))
    with pytest.raises(JaxeditError, match="restore"):
        trace_restore(model.params, model.cfg, key=jax.random.key(0), restore={"mlp_out": np.ones((1, 1, 2), bool)},
                      **_kwargs(data))
