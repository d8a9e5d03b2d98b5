"""Per-layer linear probes (multinomial logistic regression) on residual-stream vectors, in JAX.

One compiled program fits every layer's probe at once (vmap over layers), full batch, with
L-BFGS for a fixed number of iterations. Objective per layer, as sklearn's
`LogisticRegression(C)` up to a 1/N factor: mean cross-entropy + ||W||² / (2·C·N_train), the
intercept unpenalized. Features are standardized with the training split's mean and std.
Axes: L layers, N examples, D features, C classes.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxedit.errors import JaxeditError


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Accuracy of one probe per layer, and the split it was measured on."""

    test_accuracy: np.ndarray  # [L]
    train_accuracy: np.ndarray  # [L]
    train_index: np.ndarray  # [N_train] rows used to fit
    test_index: np.ndarray  # [N_test] held-out rows


def train_test_rows(n: int, seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle split of range(n): (train indices, test indices); ceil(test_fraction·n) held out."""
    n_test = int(np.ceil(test_fraction * n))
    if not 0 < n_test < n:
        raise JaxeditError(f"cannot hold out {test_fraction} of {n} examples: give more examples or another test_fraction")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def fit_probe(x: jax.Array, y: jax.Array, n_classes: int, l2: float, steps: int) -> tuple[jax.Array, jax.Array]:
    """Weights [D,C] and intercept [C] minimizing mean CE(x [N,D] @ W + b, y [N]) + l2/2·||W||²."""
    params = (jnp.zeros((x.shape[1], n_classes), x.dtype), jnp.zeros((n_classes,), x.dtype))

    def loss(params):
        w, b = params
        logp = jax.nn.log_softmax(x @ w + b)
        return -jnp.take_along_axis(logp, y[:, None], axis=1).mean() + 0.5 * l2 * jnp.sum(w * w)

    opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=20, store_grad=True))
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params


@partial(jax.jit, static_argnames=("n_classes", "steps"))
def _fit_and_score(features, labels, train, test, l2, n_classes: int, steps: int):
    """(train accuracy [L], test accuracy [L]) of per-layer probes on features [L,N,D]."""
    x = features.astype(jnp.float32)
    mean = x[:, train].mean(axis=1, keepdims=True)
    std = x[:, train].std(axis=1, keepdims=True)
    x = (x - mean) / jnp.where(std > 0, std, 1.0)
    y_train, y_test = labels[train], labels[test]
    w, b = jax.vmap(fit_probe, in_axes=(0, None, None, None, None))(x[:, train], y_train, n_classes, l2, steps)

    def accuracy(rows, y):
        logits = jnp.einsum("lnd,ldc->lnc", x[:, rows], w) + b[:, None]
        return (logits.argmax(-1) == y).mean(-1)

    return accuracy(train, y_train), accuracy(test, y_test)


def probe_accuracy(
    features,
    labels,
    *,
    n_classes: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    C: float = 1.0,
    steps: int = 100,
) -> ProbeResult:
    """Fit a probe per layer on features [L,N,D] with integer labels [N]; accuracy on a seeded 80/20 split."""
    features, labels = jnp.asarray(features), np.asarray(labels)
    if features.ndim != 3 or labels.shape != features.shape[1:2]:
        raise JaxeditError(f"probe features {features.shape} and labels {labels.shape} do not fit: want [L,N,D] and [N]")
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    train, test = train_test_rows(labels.shape[0], seed, test_fraction)
    train_acc, test_acc = _fit_and_score(features, jnp.asarray(labels, jnp.int32), train, test,
                                         1.0 / (C * len(train)), n_classes, steps)
    return ProbeResult(np.asarray(test_acc), np.asarray(train_acc), train, test)
