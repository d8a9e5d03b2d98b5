"""The layer matrices' product (`models.linear.project`): value and gradients against float64 numpy by hand
(dx = dy·wᵀ, dw = xᵀ·dy summed over batch and positions), for the shapes the model multiplies, and the
forward bit-identical to the einsum the model used before."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.models.linear import project

SHAPES = {  # x [B,T,in…], w [in…,out…], the model's former einsum
    "query": ((2, 5, 6), (6, 3, 4), "btd,dhe->bthe"),
    "attention output": ((2, 5, 3, 4), (3, 4, 6), "bthe,hed->btd"),
    "mlp": ((2, 5, 6), (6, 7), "btd,df->btf"),
}


@pytest.mark.parametrize("name", SHAPES)
def test_value_and_gradients_match_a_hand_computation(name):
    x_shape, w_shape, spec = SHAPES[name]
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    dy = rng.normal(size=x_shape[:2] + w_shape[len(x_shape) - 2:])
    y, vjp = jax.vjp(project, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    n_in = len(x_shape) - 2
    x2, w2, dy2 = x.reshape(10, -1), w.reshape(int(np.prod(w_shape[:n_in])), -1), dy.reshape(10, -1)
    np.testing.assert_allclose(np.asarray(y).reshape(10, -1), x2 @ w2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), (dy2 @ w2.T).reshape(x_shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), (x2.T @ dy2).reshape(w_shape), rtol=1e-5, atol=1e-5)
    assert dw.shape == w_shape and dx.shape == x_shape


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_the_einsum_bit_for_bit(name, dtype):
    x_shape, w_shape, spec = SHAPES[name]
    x = jax.random.normal(jax.random.key(1), x_shape, dtype)
    w = jax.random.normal(jax.random.key(2), w_shape, dtype)
    ours, einsum = jax.jit(project)(x, w), jax.jit(lambda x, w: jnp.einsum(spec, x, w))(x, w)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(einsum, np.float32))
