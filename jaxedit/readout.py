"""One forward read at chosen positions: candidate probabilities, token log-probs, logits, residuals.

`read` is the pure function (differentiated inside the training graphs), `read_jit` its jitted
entry (static cfg and reads, optionally one read per adversary of an embedding hook), and the
host helpers run it over fixed-shape batches (`data.batching.fixed_batches`).
The paper's "continuous accuracy" (method.md §5.1) is `candidate_probs`: the probability of the
right answer normalized over the candidate answers; argmax accuracy is whether it is the largest.
Axes: R adversaries, B batch, T positions, P read positions, C candidates / asked tokens,
L layers, D d_model, V vocab, N prompts.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.data.batching import first_tokens, fitted_batch_size, fixed_batches, padded_batches, shared_prefix_length
from jaxedit.errors import JaxeditError
from jaxedit.models import core
from jaxedit.sharding import on_data
from jaxedit.tokenizer import pad

RESIDUALS = ("resid_pre", "resid_post")
LOGIT_READS = ("logits", "candidates", "log_probs", "top")
FINAL = "final"


def read(params, cfg, tokens, mask, reads: tuple[str, ...], positions=None, columns=None, ids=None,
         embed_hook=None, remat: bool = False, frozen_below: int = 0, prefix=None) -> dict[str, jax.Array]:
    """One forward of tokens/mask [B,T] read at positions [B,P] (default: each row's last real token).

    reads (any of): 'logits' [B,P,V]; 'candidates' [B,P,C] float32 softmax over the logits of token
    columns [C]; 'log_probs' [B,P,C] full-vocabulary float32 log-probs of token ids [B,C] and 'top'
    [B,P] their argmax token; 'resid_pre' / 'resid_post' [L,B,P,D] of every layer; 'final' [B,P,D] the
    residual after the last layer, before the final norm (`core.unembed` of it gives 'logits'). embed_hook: a
    function of the raw embedding rows [B,T,D] (`core.embed`). Only the read positions are unembedded.
    frozen_below: no backward below that layer (`core.run_layers`). prefix [S]: token ids every row
    starts with, left out of tokens (`core.forward_shared_prefix`; logit and final reads only, positions
    index tokens).
    """
    positions = core.last_positions(mask) if positions is None else positions
    capture = tuple(s for s in RESIDUALS if s in reads)
    if prefix is None:
        final, cache = core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=positions,
                                    capture=capture, remat=remat, embed_hook=embed_hook,
                                    frozen_below=frozen_below, unembedded=False)
    elif capture or embed_hook is not None:
        raise JaxeditError("a shared-prefix read gives logit and final reads only (no residuals, no embedding hook)")
    else:
        final, cache = core.forward_shared_prefix(params, cfg, prefix, tokens, mask, positions, remat,
                                                  frozen_below, unembedded=False), {}
    out = {s: jnp.take_along_axis(cache[s], positions[None, :, :, None], axis=2) for s in capture}
    if FINAL in reads:
        out[FINAL] = final
    if not set(LOGIT_READS) & set(reads):
        return out
    logits = core.unembed(cfg, params, final)
    if "logits" in reads:
        out["logits"] = logits
    if "candidates" in reads:
        out["candidates"] = jax.nn.softmax(logits[..., columns].astype(jnp.float32), axis=-1)
    if "log_probs" in reads or "top" in reads:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if "log_probs" in reads:
            out["log_probs"] = jnp.take_along_axis(logp, ids[:, None, :], axis=2)
        if "top" in reads:
            out["top"] = logp.argmax(-1)
    return out


@partial(jax.jit, static_argnames=("cfg", "reads", "hook"))
def read_jit(params, cfg, tokens, mask, reads: tuple[str, ...], positions=None, columns=None, ids=None, hook=None,
             hook_args=None, prefix=None) -> dict[str, jax.Array]:
    """`read` under jit. With hook(adversary, shared, rows) -> rows and hook_args = (adversaries [R,...],
    shared): one read per adversary (vmap), every output with a leading R axis. prefix: see `read`."""
    if hook is None:
        return read(params, cfg, tokens, mask, reads, positions, columns, ids, prefix=prefix)
    adversaries, shared = hook_args
    return jax.vmap(lambda adv: read(params, cfg, tokens, mask, reads, positions, columns, ids,
                                     partial(hook, adv, shared)))(adversaries)


def read_prompts(model, rows: list[list[int]], reads: tuple[str, ...], *, params=None, batch_size: int = 16,
                 padding_side: str = "right", columns=None, ids=None, hook=None, adversaries=None,
                 slots: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    """`read_jit` at the last real token of token rows [N] in `padded_batches` of `fitted_batch_size` rows:
    {read: [N,...] (hook: [R,N,...])}.
    Each batch shards over the 'data' axis of the mesh `params` live on (`sharding.on_data`). Logit reads of
    right-padded rows that start with the same tokens (a template's head) run those once
    (`batching.shared_prefix_length`, `core.forward_shared_prefix`).

    ids [N,C]: per-row asked tokens ('log_probs'). hook: see `read_jit`, with `adversaries` and the
    per-row `slots` (padded with -1 like the tokens) as its arguments.
    """
    params = model.params if params is None else params
    axis = 0 if hook is None else 1
    prefix = None
    if hook is None and padding_side == "right" and not set(reads) & set(RESIDUALS):
        n = shared_prefix_length(rows)
        prefix, rows = (jnp.asarray(rows[0][:n], jnp.int32), [r[n:] for r in rows]) if n else (None, rows)
    parts = []
    batch_size = fitted_batch_size(len(rows), batch_size)
    for _, index, n_real, tokens, mask in padded_batches(rows, model.tokenizer.pad_token_id, batch_size,
                                                         padding_side):
        shared = None if slots is None else pad([slots[i] for i in index], -1, padding_side, tokens.shape[1])[0]
        tokens, mask, asked, shared = on_data(params, (tokens, mask, None if ids is None else ids[index], shared))
        got = read_jit(params, model.cfg, tokens, mask, reads, None, columns, asked, hook,
                       None if hook is None else (adversaries, shared), prefix)
        parts.append({k: np.asarray(v)[(slice(None),) * axis + (slice(0, n_real),)] for k, v in got.items()})
    return {k: np.concatenate([p[k] for p in parts], axis=axis) for k in parts[0]}


def candidate_probs(model, prompts: list[str], answers: list[str], params=None, batch_size: int = 16) -> np.ndarray:
    """[N,C] probability of each candidate answer (first token), softmax over the C candidates."""
    candidates = jnp.asarray(first_tokens(model.tokenizer, answers))
    rows = [model.tokenizer.encode(p) for p in prompts]
    got = read_prompts(model, rows, ("candidates",), params=params, batch_size=batch_size, columns=candidates)
    return got["candidates"][:, 0]


def known(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """[N] bool: the model gives the true candidate (index labels [N]) at least `threshold`."""
    return probs[np.arange(len(labels)), labels] >= threshold


def token_log_probs(model, prompts: list[str], ids, params=None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Full-vocabulary log-probs [N,C] of token ids [N,C] after each prompt, and the argmax token [N].

    One jitted program per length bucket; right padding, read at the last real position.
    """
    ids = np.asarray(ids, np.int32)
    if not prompts:
        return np.zeros(ids.shape, np.float32), np.zeros(0, np.int64)
    rows = [model.tokenizer.encode(p) for p in prompts]
    got = read_prompts(model, rows, ("log_probs", "top"), params=params, batch_size=min(batch_size, len(prompts)),
                       ids=ids)
    return got["log_probs"][:, 0], got["top"][:, 0].astype(np.int64)


def logits_after(model, prompts: list[str], params=None) -> np.ndarray:
    """Logits [N,V] of the token after each prompt: one right-padded batch, last real position only."""
    params = model.params if params is None else params
    tokens, mask = on_data(params, model.encode(prompts))
    return np.asarray(read_jit(params, model.cfg, tokens, mask, ("logits",))["logits"][:, 0])


def resid_at(cfg, params, tokens, mask, index, site: str = "resid_pre", batch_size: int = 32) -> np.ndarray:
    """`site` ('resid_pre' or 'resid_post') of every layer at positions index of each padded row of tokens/mask
    [N,T]: index [N] gives [L,N,D], index [N,P] (several positions per row, one forward) [L,N,P,D]. In
    `fixed_batches` of `fitted_batch_size(N, batch_size)` rows (sharded by `sharding.on_data`)."""
    tokens, mask, index = np.asarray(tokens), np.asarray(mask), np.asarray(index)
    positions = index if index.ndim == 2 else index[:, None]
    out = []
    for _, rows, n_real in fixed_batches(len(tokens), fitted_batch_size(len(tokens), batch_size)):
        rows_tokens, rows_mask, rows_positions = on_data(params, (tokens[rows], mask[rows], positions[rows]))
        got = read_jit(params, cfg, rows_tokens, rows_mask, (site,), rows_positions)[site]
        out.append(got[:, :n_real])
    out = np.asarray(jnp.concatenate(out, axis=1))
    return out if index.ndim == 2 else out[:, :, 0]
