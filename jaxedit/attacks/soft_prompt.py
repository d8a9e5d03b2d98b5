"""Soft-prompt (embedding-space) attacks on an edit (method.md §5.7, §10.19).

Two universal adversaries, trained with the model frozen to make it say the label after each prompt:

* 'attention' (the paper's): M learned key and value vectors [M,D], a query projection [D,D] and a
  single-head attention with in- and out-projections, no biases (torch
  `nn.MultiheadAttention(D, 1, bias=False)`); every token embedding x becomes
  x + Attn(query_proj(x), keys, values).
* 'prefix': M learned vectors inserted right after BOS (a literal soft prompt; positions shift).

Both act on the raw token-embedding rows, before Gemma's sqrt(D) scale and before learned position
embeddings: where the paper's hook on `embed_tokens` acted in the transformers versions it used
(Gemma's scale was applied after that module). After every AdamW step each key/value (or prefix)
row is projected onto the L2 ball of radius eps. `restarts` independent adversaries (own init and
batch order) are trained side by side under `vmap`: every adversary pytree has a leading restart
axis R, and every attacked metric comes back per restart (the paper reports the mean over R).

Axes: R restarts, B batch, T positions, P supervised positions, D d_model, M adversary vectors,
N prompts, C candidates, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxedit.data.batching import bucket_length, cycling_order, first_tokens, fixed_batches
from jaxedit.errors import JaxeditError
from jaxedit.readout import read, read_prompts
from jaxedit.sharding import on_data
from jaxedit.tokenizer import pad

KINDS = ("attention", "prefix")
NORM_BOUNDED = ("keys", "values", "vectors")


@dataclasses.dataclass(frozen=True)
class SoftPromptSettings:
    """§5.7 hyper-parameters (paper: 128 steps, batch 16, 4 restarts, lr 1e-5, eps 6)."""

    kind: str = "attention"
    n_vectors: int = 15
    eps: float = 6.0
    lr: float = 1e-5
    grad_clip: float = 1.0
    steps: int = 128
    batch_size: int = 16
    restarts: int = 4
    enabled: bool = True  # False: the experiment runs no soft-prompt attack

    def __post_init__(self):
        if self.kind not in KINDS:
            raise JaxeditError(f"soft-prompt kind {self.kind!r} is unknown: use one of {', '.join(KINDS)}")
        for name in ("n_vectors", "steps", "batch_size", "restarts"):
            if getattr(self, name) < 1:
                raise JaxeditError(f"soft-prompt {name} must be at least 1, got {getattr(self, name)}")
        if not (self.eps > 0 and self.lr > 0 and self.grad_clip > 0):
            raise JaxeditError("soft-prompt eps, lr and grad_clip must be positive")


def init_adversary(d_model: int, settings: SoftPromptSettings, seed: int = 0) -> dict:
    """Untrained adversaries with a leading R axis, initialized as torch initializes the modules.

    attention: {'keys','values' [R,M,D] (torch `kaiming_uniform_`, a=0: U(±sqrt(6/D))),
    'w_query' and 'w_o' [R,D,D] (nn.Linear: U(±1/sqrt(D))), 'w_q','w_k','w_v' [R,D,D] (the
    MHA's xavier-uniform in-projection, U(±sqrt(6/(D+3D))))}; prefix: {'vectors' [R,M,D]} like keys.
    Matrices act as x @ W (torch's weight transposed). Restart r draws from numpy seed (seed, r).
    Rows start inside the eps ball.
    """
    m, d = settings.n_vectors, d_model
    rows, linear, in_proj = (m, d, math.sqrt(6.0 / d)), (d, d, 1.0 / math.sqrt(d)), (d, d, math.sqrt(6.0 / (4 * d)))
    shapes = {"vectors": rows} if settings.kind == "prefix" else {
        "keys": rows, "values": rows, "w_query": linear, "w_q": in_proj, "w_k": in_proj, "w_v": in_proj, "w_o": linear}
    rngs = [np.random.default_rng((seed, r)) for r in range(settings.restarts)]
    stacked = {name: jnp.asarray(np.stack([rng.uniform(-bound, bound, (a, b)) for rng in rngs]), jnp.float32)
               for name, (a, b, bound) in shapes.items()}
    return project(stacked, settings.eps)


def project(adversary: dict, eps: float | jax.Array) -> dict:
    """Clip the L2 norm of every key/value/prefix row [..., D] to eps; other leaves unchanged."""

    def clip(name, a):
        if name not in NORM_BOUNDED:
            return a
        norm = jnp.linalg.norm(a, axis=-1, keepdims=True)
        return a * jnp.minimum(1.0, eps / jnp.maximum(norm, 1e-12))

    return {name: clip(name, a) for name, a in adversary.items()}


def attention_delta(adversary: dict, x: jax.Array) -> jax.Array:
    """Attn(query_proj(x), keys, values) [..., T, D] in float32 for embeddings x [..., T, D] (one adversary)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    q = x @ adversary["w_query"] @ adversary["w_q"]
    k = adversary["keys"] @ adversary["w_k"]  # [M,D]
    v = adversary["values"] @ adversary["w_v"]
    weights = jax.nn.softmax(q @ k.T / math.sqrt(q.shape[-1]), axis=-1)  # [..., T, M]
    return weights @ v @ adversary["w_o"]


def adversary_rows(adversary: dict, slots: jax.Array, x: jax.Array) -> jax.Array:
    """Raw token-embedding rows x [B,T,D] with one adversary (no R axis) applied: the `core.embed` hook.

    slots [B,T]: index of the prefix vector at each position, -1 elsewhere (ignored by 'attention').
    """
    if "vectors" in adversary:
        inserted = jnp.take(adversary["vectors"], jnp.maximum(slots, 0), axis=0).astype(x.dtype)
        return jnp.where((slots >= 0)[..., None], inserted, x)
    return x + attention_delta(adversary, x).astype(x.dtype)


def _label_nll(adversary, params, batch, cfg) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(label token), number of label tokens) of one batch {'tokens','mask','slots' [B,T],
    'positions','targets','weights' [B,P]}."""
    logits = read(params, cfg, batch["tokens"], batch["mask"], ("logits",), batch["positions"],
                  embed_hook=partial(adversary_rows, adversary, batch["slots"]))["logits"]
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    weights = batch["weights"].astype(picked.dtype)
    return -(picked * weights).sum(), weights.sum()


def _optimizer(lr, grad_clip) -> optax.GradientTransformation:
    """AdamW (torch defaults, weight decay 0) after global-norm clipping; lr and clip may be traced."""
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(lr, weight_decay=0.0))


@partial(jax.jit, static_argnames="cfg")
def _train_step(params, adversary, opt_state, batch, lr, grad_clip, eps, cfg):
    """One AdamW step of every restart: adversary/opt_state/batch carry the R axis; returns losses [R]."""
    optimizer = _optimizer(lr, grad_clip)

    def loss_fn(adv, b):
        total, count = _label_nll(adv, params, b, cfg)
        return total / jnp.maximum(count, 1.0)

    def one(adv, state, b):
        loss, grads = jax.value_and_grad(loss_fn)(adv, b)
        updates, state = optimizer.update(grads, state, adv)
        return project(optax.apply_updates(adv, updates), eps), state, loss

    return jax.vmap(one)(adversary, opt_state, batch)


@partial(jax.jit, static_argnames="cfg")
def _nll_sums(params, adversary, batch, cfg):
    """(label NLL sums [R], label token counts [R]) of one batch (no R axis) under every restart."""
    return jax.vmap(lambda adv: _label_nll(adv, params, batch, cfg))(adversary)


def _n_slots(adversary: dict) -> int:
    return adversary["vectors"].shape[1] if "vectors" in adversary else 0


def _with_slots(tokenizer, prompts: list[str], n_slots: int) -> tuple[list[list[int]], list[list[int]]]:
    """(token rows, slot rows): n_slots placeholders right after BOS (at the start without BOS)."""
    if tokenizer is None:
        raise JaxeditError("the model has no tokenizer: load it from a directory with tokenizer.json")
    if not prompts:
        raise JaxeditError("no prompts given: pass at least one prompt")
    rows, slots = [], []
    for text in prompts:
        ids = tokenizer.encode(text)
        at = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        rows.append(ids[:at] + [tokenizer.pad_token_id] * n_slots + ids[at:])
        slots.append([-1] * at + list(range(n_slots)) + [-1] * (len(ids) - at))
    return rows, slots


def _label_data(tokenizer, prompts: list[str], labels: list[str], n_slots: int) -> dict:
    """Arrays [N,...] of prompt (+ slots) + label tokens, right-padded: tokens/mask/slots [N,T] and
    positions/targets/weights [N,P] (logit position predicting each label token)."""
    if len(prompts) != len(labels):
        raise JaxeditError(f"got {len(prompts)} prompts but {len(labels)} labels: give one label per prompt")
    rows, slots = _with_slots(tokenizer, prompts, n_slots)
    label_ids = [tokenizer.encode(label, add_special_tokens=False) for label in labels]
    if not all(label_ids):
        raise JaxeditError("a label encodes to no tokens: give non-empty label strings")
    p = max(len(ids) for ids in label_ids)
    full = [row + ids for row, ids in zip(rows, label_ids)]
    length = bucket_length(max(len(r) for r in full))
    tokens, mask = pad(full, tokenizer.pad_token_id, "right", length)
    slot_arr, _ = pad([s + [-1] * len(ids) for s, ids in zip(slots, label_ids)], -1, "right", length)
    positions = np.zeros((len(full), p), np.int32)
    targets = np.zeros((len(full), p), np.int32)
    weights = np.zeros((len(full), p), np.float32)
    for i, (row, ids) in enumerate(zip(rows, label_ids)):
        positions[i, :len(ids)] = len(row) - 1 + np.arange(len(ids))
        targets[i, :len(ids)] = ids
        weights[i, :len(ids)] = 1.0
    return {"tokens": tokens, "mask": mask, "slots": slot_arr, "positions": positions, "targets": targets,
            "weights": weights}


def train_adversary(model, params, prompts: list[str], labels: list[str],
                    settings: SoftPromptSettings = SoftPromptSettings(), seed: int = 0, progress: bool = False) -> dict:
    """Train `settings.restarts` universal adversaries on (prompt, label) pairs; returns {name: [R,...]}.

    Objective: mean CE of the label tokens appended to each prompt, model params frozen (only read).
    Restart r draws its own init (numpy seed (seed, r)) and batch order (seed (seed, r, 1)). Batches
    [R,B,...] shard B over the 'data' axis of the mesh `params` live on (`sharding.on_data`).
    """
    params = model.params if params is None else params
    adversary = init_adversary(model.cfg.d_model, settings, seed)
    data = _label_data(model.tokenizer, prompts, labels, _n_slots(adversary))
    n, need = len(prompts), settings.steps * settings.batch_size

    def shuffle(r):  # restart r's seeded shuffle, the same in every cycle
        return lambda k: np.random.default_rng((seed, r, 1)).permutation(k)

    orders = np.stack([cycling_order(shuffle(r), n, need) for r in range(settings.restarts)])
    opt_state = jax.vmap(_optimizer(settings.lr, settings.grad_clip).init)(adversary)
    scalars = [jnp.float32(v) for v in (settings.lr, settings.grad_clip, settings.eps)]
    for step in tqdm(range(settings.steps), file=sys.stderr, disable=not progress,
                     desc=f"soft-prompt {settings.kind}"):
        rows = orders[:, step * settings.batch_size:(step + 1) * settings.batch_size]  # [R,B]
        batch = on_data(params, {key: value[rows] for key, value in data.items()}, axis=1)
        adversary, opt_state, _ = _train_step(params, adversary, opt_state, batch, *scalars, model.cfg)
    return adversary


def attack_loss(model, params, adversary: dict, prompts: list[str], labels: list[str],
                batch_size: int = 16) -> np.ndarray:
    """[R] mean CE per label token over all (prompt, label) pairs under each restart's adversary."""
    params = model.params if params is None else params
    data = _label_data(model.tokenizer, prompts, labels, _n_slots(adversary))
    total = count = 0.0
    for _, rows, n_real in fixed_batches(len(prompts), batch_size):
        batch = {key: value[rows] for key, value in data.items()}
        batch["weights"] = batch["weights"] * (np.arange(batch_size) < n_real)[:, None]  # repeats count 0
        sums, counts = _nll_sums(params, adversary, on_data(params, batch), model.cfg)
        total, count = total + np.asarray(sums), count + np.asarray(counts)
    return total / count


def _attacked_reads(model, params, adversary, prompts, reads, batch_size, padding_side="right", **kwargs) -> dict:
    """`readout.read_prompts` at the last token of each prompt (+ slots) under every restart: {read: [R,N,...]}."""
    rows, slots = _with_slots(model.tokenizer, prompts, _n_slots(adversary))
    return read_prompts(model, rows, reads, params=params, batch_size=batch_size, padding_side=padding_side,
                        hook=adversary_rows, adversaries=adversary, slots=slots, **kwargs)


def attacked_last_logits(model, params, adversary: dict, prompts: list[str], batch_size: int = 32,
                         padding_side: str = "right") -> np.ndarray:
    """[R,N,V] float32 logits of the token after each prompt with each restart's adversary."""
    logits = _attacked_reads(model, params, adversary, prompts, ("logits",), batch_size, padding_side)["logits"]
    return logits[:, :, 0].astype(np.promote_types(logits.dtype, np.float32))


def attacked_candidate_probs(model, params, adversary: dict, prompts: list[str], answers: list[str],
                             batch_size: int = 32) -> np.ndarray:
    """[R,N,C] probability of each answer's first token, softmax over the C answers (as `readout.candidate_probs`)."""
    candidates = jnp.asarray(first_tokens(model.tokenizer, answers))
    got = _attacked_reads(model, params, adversary, prompts, ("candidates",), batch_size, columns=candidates)
    return got["candidates"][:, :, 0]


def attacked_token_probs(model, params, adversary: dict, prompts: list[str], token_ids,
                         batch_size: int = 32) -> np.ndarray:
    """[R,N] full-vocabulary probability of token_ids [N] after each prompt (CounterFact's P(target))."""
    token_ids = np.asarray(token_ids, np.int32)
    if token_ids.shape != (len(prompts),):
        raise JaxeditError(f"got {token_ids.shape} token ids for {len(prompts)} prompts: give one id per prompt")
    got = _attacked_reads(model, params, adversary, prompts, ("log_probs",), batch_size, ids=token_ids[:, None])
    return np.asarray(jnp.exp(got["log_probs"][:, :, 0, 0]))  # XLA's exp, as in the jitted read
