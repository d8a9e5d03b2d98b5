"""Latent-knowledge probing of an edit (method.md §5.6).

Activations: the residual stream entering each layer (resid_pre of layers 0..L-1, i.e. HF
`hidden_states[0 … L-1]`, index 0 = the scaled embeddings; the last block's output is not probed)
of the training-format prompt, left padding, under the EDITED params, read at one of `POSITIONS`:
'prompt', the last prompt token (the paper's probe), or 'subject', the subject's last token (an
extra probe of what stays on the name; not in the paper).
Per layer, a multinomial logistic-regression probe (`localize.probes.fit_probe`) is fitted on the
maintain athletes (true sport; a seeded 80/20 split gives the maintain test accuracy) and applied
to the forget athletes: ground-truth accuracy (prediction == original sport; low = knowledge gone)
and edit accuracy (prediction == injected sport). One compiled program fits every layer (vmap).
Axes: L layers, N athletes, T positions, D d_model, C classes (the three team sports).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.data import sports
from jaxedit.errors import JaxeditError
from jaxedit.localize.fact_lookup import subject_last_tokens
from jaxedit.localize.probes import fit_probe, train_test_rows
from jaxedit.readout import resid_at

POSITIONS = {"prompt": "probe", "subject": "probe_subject"}  # read position -> prefix of its row keys

@dataclasses.dataclass(frozen=True)
class LatentResult:
    """Per-layer probe accuracies [L]."""

    maintain_test: np.ndarray  # held-out maintain athletes, true sport
    forget_ground_truth: np.ndarray  # forget athletes, prediction == original sport
    forget_edit: np.ndarray  # forget athletes, prediction == injected sport

    def row(self, prefix: str) -> dict:
        """Row keys: accuracy by layer [L] (lists, for the plots) and the last probed layer's, e.g. 'probe_gt_last'."""
        return {f"{prefix}_maintain_test": self.maintain_test.tolist(),
                f"{prefix}_ground_truth": self.forget_ground_truth.tolist(),
                f"{prefix}_edit": self.forget_edit.tolist(),
                f"{prefix}_gt_last": float(self.forget_ground_truth[-1]),
                f"{prefix}_edit_last": float(self.forget_edit[-1])}


@partial(jax.jit, static_argnames=("n_classes", "steps"))
def _probe_predictions(train_x, train_y, apply_x, l2, n_classes: int, steps: int):
    """Predictions [L,M] of per-layer probes fitted on train_x [L,N,D], train_y [N], applied to apply_x [L,M,D]."""
    mean = train_x.mean(axis=1, keepdims=True)
    std = train_x.std(axis=1, keepdims=True)
    std = jnp.where(std > 0, std, 1.0)
    w, b = jax.vmap(fit_probe, in_axes=(0, None, None, None, None))((train_x - mean) / std, train_y, n_classes,
                                                                     l2, steps)
    logits = jnp.einsum("lmd,ldc->lmc", (apply_x - mean) / std, w) + b[:, None]
    return logits.argmax(-1)


def probe_predictions(train_x, train_y, apply_x, *, n_classes: int, C: float = 1.0, steps: int = 100) -> np.ndarray:
    """Per-layer probe predictions [L,M]: fit on train_x [L,N,D] / train_y [N], predict apply_x [L,M,D]."""
    train_x, apply_x = jnp.asarray(train_x, jnp.float32), jnp.asarray(apply_x, jnp.float32)
    return np.asarray(_probe_predictions(train_x, jnp.asarray(train_y, jnp.int32), apply_x,
                                         1.0 / (C * train_x.shape[1]), n_classes, steps))


def probe_edit(maintain_x, maintain_y, forget_x, forget_true, forget_inject, *, n_classes: int = 3, seed: int = 0,
               C: float = 1.0, steps: int = 100) -> LatentResult:
    """Probe accuracies from features: maintain_x [L,N,D] with labels [N]; forget_x [L,M,D] with true/injected [M]."""
    maintain_y = np.asarray(maintain_y)
    train, test = train_test_rows(len(maintain_y), seed)
    apply_x = np.concatenate([np.asarray(maintain_x)[:, test], np.asarray(forget_x)], axis=1)
    pred = probe_predictions(np.asarray(maintain_x)[:, train], maintain_y[train], apply_x, n_classes=n_classes,
                             C=C, steps=steps)
    held, forget = pred[:, : len(test)], pred[:, len(test):]
    return LatentResult((held == maintain_y[test]).mean(-1), (forget == np.asarray(forget_true)).mean(-1),
                        (forget == np.asarray(forget_inject)).mean(-1))


def probe_tokens(tokenizer, facts: list):
    """(ids [N,T], mask [N,T], {position: index [N]}) of the facts' training-format prompts, left padding:
    the read index of every `POSITIONS` entry."""
    ids, mask, subject = subject_last_tokens(tokenizer, [sports.prompt(f.athlete) for f in facts],
                                             [f.athlete for f in facts], padding_side="left")
    return ids, mask, {"prompt": np.full(len(facts), ids.shape[1] - 1), "subject": subject}


def probe_features(model, facts: list, params=None, positions=tuple(POSITIONS)) -> dict[str, np.ndarray]:
    """{position: resid_pre [L,N,D] (float32)} of every layer at each of `positions` of each fact's prompt under
    `params`, read by one forward."""
    unknown = set(positions) - set(POSITIONS)
    if unknown:
        raise JaxeditError(f"probe position(s) {sorted(unknown)} unknown: use some of {', '.join(POSITIONS)}")
    params = model.params if params is None else params
    ids, mask, index = probe_tokens(model.tokenizer, facts)
    x = resid_at(model.cfg, params, ids, mask, np.stack([index[p] for p in positions], axis=1))  # [L,N,P,D]
    return {p: np.asarray(x[:, :, i], np.float32) for i, p in enumerate(positions)}


def latent_knowledge(model, forget: list, maintain: list, *, params=None, seed: int = 0,
                     inject_field: str = "inject_without_golf", steps: int = 100,
                     positions=tuple(POSITIONS)) -> dict[str, LatentResult]:
    """§5.6 on sports facts, {position: result}: probes on the maintain athletes' activations under `params`,
    applied to `forget`."""
    if any(f.sport not in sports.TEAM_SPORTS or getattr(f, inject_field) not in sports.TEAM_SPORTS for f in forget) \
            or any(f.sport not in sports.TEAM_SPORTS for f in maintain):
        raise JaxeditError("latent probing classifies the three team sports: drop golfers and golf injections")
    features = probe_features(model, list(maintain) + list(forget), params, positions)
    label = lambda rows, field: np.array([sports.TEAM_SPORTS.index(getattr(f, field)) for f in rows])  # noqa: E731
    n = len(maintain)
    return {p: probe_edit(x[:, :n], label(maintain, "sport"), x[:, n:], label(forget, "sport"),
                          label(forget, inject_field), seed=seed, steps=steps) for p, x in features.items()}
