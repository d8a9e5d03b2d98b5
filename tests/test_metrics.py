"""Metrics that read a few logit columns unembed only those: same values as the full unembedding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxedit
from jaxedit.localize import metrics
from jaxedit.models import core
from tiny_models import VOCAB, save_hf_model


@pytest.mark.parametrize("family", ["llama_mha", "gemma2"])  # untied unembedding; tied with a final soft-cap
def test_metrics_on_residual_equal_the_full_unembedding(family, tmp_path):
    save_hf_model(family, tmp_path)
    model = jaxedit.load(tmp_path)
    cfg, params = model.cfg, model.params
    x = 3.0 * jax.random.normal(jax.random.key(0), (4, cfg.d_model))
    rng = np.random.default_rng(0)
    answer = jnp.asarray(rng.integers(0, VOCAB, 4))
    one_other, candidates = jnp.asarray(rng.integers(0, VOCAB, 4)), jnp.asarray(rng.integers(0, VOCAB, (4, 3)))
    logits = core.unembed(cfg, params, x)
    cases = [(metrics.logit_diff, (answer, one_other)), (metrics.logit_diff, (answer, candidates)),
             (metrics.answer_prob, (answer, candidates)), (metrics.answer_prob, (answer,))]
    for metric, args in cases:
        full = metric(logits, *args)
        np.testing.assert_allclose(metrics.on_residual(cfg, params, metric, x, *args), full, rtol=1e-5, atol=1e-6)
        assert np.ptp(np.asarray(full)) > 1e-3
    ids = jnp.asarray(rng.integers(0, VOCAB, (4, 5)))
    np.testing.assert_allclose(core.unembed_columns(cfg, params, x, ids), jnp.take_along_axis(logits, ids, 1),
                               rtol=1e-5, atol=1e-6)
