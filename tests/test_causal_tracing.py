"""Causal tracing: reproducible noise, full restores recover the clean run, sweeps equal transformers with torch hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxedit
from jaxedit.errors import JaxeditError
from jaxedit.localize import corruptions
from jaxedit.localize.causal_tracing import trace_components, trace_grid, trace_restore
from jaxedit.models import core
from tiny_models import hf_forward, make_hf_model, padded_batch, save_hf_model

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


def hf_nie(data, noise, restores) -> np.ndarray:
    """NIE per example [len(restores), B] of the same random Gemma-3 in transformers, with torch hooks.

    noise [S,B,T,D]: added to the (scaled) embeddings of every noised run; restores: each a list of
    (site, layer, position or None for all, head or None) whose clean values are written back: 'attn_z' is
    o_proj's input (one head's slice), 'mlp_out' the output of the MLP's post-norm, 'resid_pre' the layer's input.
    """
    hf = make_hf_model("gemma3")  # the weights `setup` saved (same seed)
    tokens, mask, subject, answer, candidates = data
    blocks = hf.model.layers
    e = hf.config.head_dim

    def modules(site, layer):
        return {"attn_z": blocks[layer].self_attn.o_proj, "mlp_out": blocks[layer].post_feedforward_layernorm,
                "resid_pre": blocks[layer]}[site]

    clean = {}
    handles = [modules(site, layer).register_forward_pre_hook(
        lambda mod, args, key=(site, layer): clean.__setitem__(key, args[0].clone()))
        for site in ("attn_z", "resid_pre") for layer in range(len(blocks))]
    handles += [modules("mlp_out", layer).register_forward_hook(
        lambda mod, args, out, key=("mlp_out", layer): clean.__setitem__(key, out.clone()))
        for layer in range(len(blocks))]
    hf_forward(hf, tokens, mask)
    for h in handles:
        h.remove()

    def written(x, site, layer, position, head):
        x = x.clone()
        where = (slice(None), slice(None) if position is None else position,
                 slice(None) if head is None else slice(head * e, (head + 1) * e))
        x[where] = clean[site, layer].repeat(len(x) // len(tokens), 1, 1)[where]  # one copy per noise sample
        return x

    def prob(delta, restore):
        """[B] answer probability; delta [S,B,T,D]: the mean over S noised runs (stacked into one batch)."""
        handles, ids, real = [], tokens, mask
        if delta is not None:
            ids, real = np.tile(tokens, (len(delta), 1)), np.tile(mask, (len(delta), 1))
            handles.append(hf.model.embed_tokens.register_forward_hook(
                lambda mod, args, out: out + delta.reshape(out.shape)))
        for site, layer, position, head in restore:
            spec = (site, layer, position, head)
            if site == "mlp_out":
                handles.append(modules(site, layer).register_forward_hook(
                    lambda mod, args, out, spec=spec: written(out, *spec)))
            else:
                handles.append(modules(site, layer).register_forward_pre_hook(
                    lambda mod, args, spec=spec: (written(args[0], *spec),) + args[1:]))
        logits = hf_forward(hf, ids, real).logits[:, -1].double().numpy()
        for h in handles:
            h.remove()
        rows = np.arange(len(logits))
        ans, cand = np.tile(answer, len(logits) // len(answer)), np.tile(candidates, (len(logits) // len(answer), 1))
        restricted = logits[rows[:, None], cand]
        top = restricted.max(1, keepdims=True)
        p = np.exp(logits[rows, ans] - top[:, 0]) / np.exp(restricted - top).sum(1)
        return p.reshape(-1, len(answer)).mean(0)

    def noised_prob(restore):
        return prob(torch.as_tensor(np.asarray(noise)), restore)

    p_clean, p_corrupt = prob(None, []), noised_prob([])
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


def test_component_sweep_equals_transformers_with_restoring_hooks(setup):
    model, data = setup
    cfg = model.cfg
    key = jax.random.key(KEY)
    result = trace_components(model.params, cfg, key=key, **_kwargs(data))
    table = np.asarray(model.params["embed"]["tokens"], np.float64) * cfg.embed_scale  # ROME's: 3·std, one number
    tokens, subject = data[0], data[2]
    np.testing.assert_allclose(result.noise_scale, 3 * table[tokens[subject]].std(), rtol=1e-5)
    noise = corruptions.subject_noise(key, jnp.asarray(subject), cfg.d_model, result.noise_scale, SAMPLES)
    restores = []
    for layer in range(cfg.n_layers):
        restores += [[("attn_z", layer, None, head)] for head in range(cfg.n_heads)]
        restores.append([("mlp_out", layer, None, None)])
    ref = hf_nie(data, noise, restores).reshape(cfg.n_layers, cfg.n_heads + 1, -1)
    assert np.abs(result.per_example["attn_z"] - ref[:, :-1]).max() <= 1e-4
    assert np.abs(result.per_example["mlp_out"] - ref[:, -1]).max() <= 1e-4
    np.testing.assert_allclose(result.nie["mlp_out"], ref[:, -1].mean(-1), atol=1e-4)
    assert np.abs(ref).max() > 0.05  # some component matters


@pytest.mark.parametrize("site, window, chunk", [("resid_pre", 1, None), ("mlp_out", 3, 4)])
def test_grid_equals_transformers_with_windowed_restoring_hooks(setup, site, window, chunk):
    model, data = setup
    cfg = model.cfg
    tokens = data[0]
    t = tokens.shape[1]
    key = jax.random.key(KEY)
    result = trace_grid(model.params, cfg, key=key, site=site, window=window, noise="paper", chunk=chunk,
                        **_kwargs(data))
    table = np.asarray(model.params["embed"]["tokens"], np.float64) * cfg.embed_scale  # the paper's: per example
    scale = np.array([np.sqrt(3 * table[row[hit]].std()) for row, hit in zip(tokens, data[2])], np.float32)
    np.testing.assert_allclose(result.noise_scale, scale, rtol=1e-5)
    noise = corruptions.subject_noise(key, jnp.asarray(data[2]), cfg.d_model, scale, SAMPLES)
    restores = []
    for layer in range(cfg.n_layers):
        lo, hi = max(0, layer - window // 2), min(cfg.n_layers, layer + (window + 1) // 2)  # ROME's centred window
        restores += [[(site, restored, pos, None) for restored in range(lo, hi)] for pos in range(t)]
    ref = hf_nie(data, noise, restores).reshape(cfg.n_layers, t, -1)
    assert result.per_example[site].shape == (cfg.n_layers, t, len(tokens))
    assert np.abs(result.per_example[site] - ref).max() <= 1e-4
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
