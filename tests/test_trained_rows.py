"""A stacked matrix trained at a few layers (`models.trained_rows`): its gradient, formed from the taps' inputs and
cotangents, equals the merged computation's (plain autodiff of the whole leaf) and float64 finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.edit.optim import loss_params, split_trainable
from jaxedit.edit.train import LossWeights, loss_terms
from jaxedit.localize import components as C
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import init_params
from jaxedit.models.trained_rows import TrainedRows

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
             head_dim=4, max_position_embeddings=64)
CONFIGS = {
    "llama": config_from_hf(dict(SMALL, model_type="llama", num_key_value_heads=2, hidden_act="silu")),
    "gemma3": config_from_hf(dict(SMALL, model_type="gemma3_text", num_key_value_heads=1, sliding_window=3,
                                  query_pre_attn_scalar=4, layer_types=["sliding_attention", "full_attention"] * 2)),
}
WEIGHTS = LossWeights(forget=1.0, maintain=1.0, lm=1.0)


def _batch(cfg, prefix: bool):
    """Forget and maintain prompts (with a shared 3-token head when `prefix`) and a general-text window."""
    rng = np.random.default_rng(0)
    tokens = lambda n, t: jnp.asarray(rng.integers(1, cfg.vocab_size, (n, t)), jnp.int32)  # noqa: E731
    mask = jnp.asarray([[1] * 5, [1] * 3 + [0] * 2], jnp.int32)
    prompts = lambda: {"tokens": tokens(2, 5), "mask": mask,  # noqa: E731
                       "target": jnp.asarray(rng.integers(0, cfg.vocab_size, 2), jnp.int32)}
    batch = {"forget": prompts(), "maintain": prompts(), "lm": {"tokens": tokens(1, 6), "mask": jnp.ones((1, 6), int)}}
    if prefix:
        head = tokens(1, 3)[0]
        batch["forget"]["prefix"] = batch["maintain"]["prefix"] = head
    return batch


def _mask(cfg):
    """A neuron and a head of layers 1 and 3: every matrix of attention and MLP trains at rows [1, 3]."""
    return C.trainable_mask(C.Components.make(["neuron", "neuron", "head", "head"], [1, 3, 1, 3], [2, 5, 1, 0]), cfg)


def _loss(cfg, batch, frozen, frozen_below, remat):
    return lambda tr: loss_terms(tr, frozen, batch, cfg, WEIGHTS.objective(), WEIGHTS.coefficients(), remat=remat,
                                 frozen_below=frozen_below)[0]


@pytest.mark.parametrize("name, prefix, frozen_below, remat", [
    ("llama", False, 0, False), ("llama", True, 1, True), ("gemma3", True, 0, False), ("gemma3", False, 1, False)])
def test_row_gradients_equal_the_whole_leafs_gradient_at_those_rows(name, prefix, frozen_below, remat):
    cfg = CONFIGS[name]
    params, mask, batch = init_params(cfg, jax.random.key(1)), _mask(cfg), _batch(cfg, prefix)
    rows = C.trained_rows(mask, cfg.n_layers)
    assert all(r.tolist() == [1, 3] for r in rows.values()) and {p[-1] for p in rows} >= {"wq", "wo", "w_up", "w_down"}
    sliced, frozen = split_trainable(params, mask, C.trained_leaves(mask), rows)
    is_rows = lambda a: isinstance(a, TrainedRows)  # noqa: E731
    seen = [a for a in jax.tree.leaves(loss_params(sliced, frozen), is_leaf=is_rows) if is_rows(a)]
    assert len(seen) == len(rows)  # the loss sees them as trained rows
    whole, whole_frozen = split_trainable(params, mask, C.trained_leaves(mask))
    value, got = jax.jit(jax.value_and_grad(_loss(cfg, batch, frozen, frozen_below, remat)))(sliced)
    want_value, want = jax.jit(jax.value_and_grad(_loss(cfg, batch, whole_frozen, frozen_below, remat)))(whole)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for path, r in rows.items():
        g, w = got, want
        for key in path:
            g, w = g[key], w[key]
        w = np.asarray(w)
        assert np.abs(w[np.asarray(r)]).max() > 0 and not np.array_equal(w[np.asarray(r)], np.zeros_like(g))
        np.testing.assert_allclose(g, w[np.asarray(r)], rtol=1e-5, atol=1e-5 * np.abs(w).max(), err_msg=str(path))


def test_row_gradients_equal_float64_finite_differences():
    """Along random directions of the trained rows, the gradient's directional derivative equals central
    differences of the merged loss (`TrainedRows.merged`) in float64."""
    cfg, eps = CONFIGS["gemma3"], 1e-6
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_params(cfg, jax.random.key(2)))
        mask, batch = _mask(cfg), _batch(cfg, prefix=True)
        trainable, frozen = split_trainable(params, mask, C.trained_leaves(mask), C.trained_rows(mask, cfg.n_layers))
        loss = _loss(cfg, batch, frozen, 0, False)
        grads = jax.jit(jax.grad(loss))(trainable)
        rng = np.random.default_rng(3)
        for _ in range(3):
            d = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), trainable)
            step = lambda sign: jax.tree.map(lambda a, b: a + sign * eps * b, trainable, d)  # noqa: E731
            numeric = (float(jax.jit(loss)(step(1))) - float(jax.jit(loss)(step(-1)))) / (2 * eps)
            analytic = sum(float((g * v).sum()) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
            assert abs(numeric) > 1e-3
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
