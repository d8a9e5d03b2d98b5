"""Probabilities of candidate answers at the last prompt position, batched and jitted.

The paper's "continuous accuracy" (method.md §5.1) is the probability of the right answer
normalized over the candidate answers; argmax accuracy is whether it is the largest.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.data.batching import first_tokens, padded_batches
from jaxedit.models import core


@partial(jax.jit, static_argnames="cfg")
def _candidate_logits(params, tokens, mask, candidates, cfg):
    logits, _ = core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=core.last_positions(mask))
    return logits[:, 0][:, candidates]


def candidate_probs(model, prompts: list[str], answers: list[str], params=None, batch_size: int = 16) -> np.ndarray:
    """[N,C] probability of each candidate answer (first token), softmax over the C candidates."""
    params = model.params if params is None else params
    candidates = jnp.asarray(first_tokens(model.tokenizer, answers))
    rows = [model.tokenizer.encode(p) for p in prompts]
    out = np.zeros((len(prompts), len(answers)), np.float32)
    for start, ids, mask in padded_batches(rows, model.tokenizer.pad_token_id, batch_size):
        logits = _candidate_logits(params, jnp.asarray(ids), jnp.asarray(mask), candidates, model.cfg)
        probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
        n = min(batch_size, len(prompts) - start)
        out[start:start + n] = probs[:n]
    return out


def known(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """[N] bool: the model gives the true candidate (index labels [N]) at least `threshold`."""
    return probs[np.arange(len(labels)), labels] >= threshold
