"""Relearning attack (method.md §5.8): fine-tune the EDITED model on half the forget set, true answers.

The forget set is split in half (CSV order); the first half is relearned with its TRUE sports
(CE to the true answer's first token; the paper's CounterFact script trained towards the false
targets, §10.1: not copied), mixed with maintain facts, and forget accuracy is measured on the
held-out second half at steps 0, 10 and 20. Either LoRA on every linear layer (PEFT's
"all-linear": q, k, v, o, gate, up, down; r = 512, α = 32 in the paper) or full fine-tuning of
every attention and MLP matrix. AdamW lr 2e-4, weight decay 0, cosine over the steps, no clipping;
one step = `accumulate` micro-batches (paper: 8 × 4 relearn + 8 × 4 maintain). The paper's Pile
term is omitted (no corpus here) and LoRA dropout (0.05) is not modelled.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxedit.data import sports
from jaxedit.data.batching import bucket_length, first_tokens
from jaxedit.edit.lora import init_lora
from jaxedit.edit.optim import cosine_schedule, masked_adamw, split_trainable, trainable_part
from jaxedit.edit.train import LoraSpec, LossWeights, full_params, train_step
from jaxedit.errors import JaxeditError
from jaxedit.eval.sports_eval import evaluate_sports
from jaxedit.localize import components
from jaxedit.tokenizer import pad


@dataclasses.dataclass(frozen=True)
class RelearnSettings:
    """§5.8 hyper-parameters; lora_rank=None means full fine-tuning of all linear weights."""

    lora_rank: int | None = 512
    lora_alpha: float = 32.0
    lr: float = 2e-4
    steps: int = 20
    eval_at: tuple[int, ...] = (0, 10, 20)
    batch_size: int = 4
    accumulate: int = 8
    formats: tuple[str, ...] = ("fact", "mcq_fact")  # templates 1 and 5, no system prompt
    seed: int = 0
    progress: bool = False


class FactBatches:
    """Micro-batches of sports prompts with answer targets, cycling seeded shuffles of each set.

    sets: {key: (facts, target field)}, e.g. {'forget': (facts, 'sport')}. `self(i)` is micro-batch i:
    {key: {'tokens' [B,T], 'mask' [B,T], 'target' [B]}} with one T for every key (one compile).
    Right padding; prompts in the training template; targets are the field's answer first token.
    """

    def __init__(self, tokenizer, sets: dict, batch_size: int, n_batches: int, seed: int = 0, fmt: str = "fact"):
        ids = first_tokens(tokenizer, list(sports.answers(fmt)))
        rng = np.random.default_rng(seed)
        encoded = {key: ([tokenizer.encode(sports.prompt(f.athlete, fmt)) for f in facts],
                         np.array([ids[sports.SPORTS.index(getattr(f, field))] for f in facts], np.int32))
                   for key, (facts, field) in sets.items() if facts}
        if not encoded:
            raise JaxeditError("no facts to train on: give at least one non-empty fact set")
        length = bucket_length(max(len(r) for rows, _ in encoded.values() for r in rows))
        need = batch_size * n_batches
        self.batch_size, self.data = batch_size, {}
        for key, (rows, target) in encoded.items():
            order = np.concatenate([rng.permutation(len(rows)) for _ in range(-(-need // len(rows)))])
            tokens, mask = pad(rows, tokenizer.pad_token_id, "right", length)
            self.data[key] = (tokens, mask, target, order)

    def __call__(self, i: int) -> dict:
        out = {}
        for key, (tokens, mask, target, order) in self.data.items():
            rows = order[i * self.batch_size:(i + 1) * self.batch_size]
            out[key] = {"tokens": jnp.asarray(tokens[rows]), "mask": jnp.asarray(mask[rows]),
                        "target": jnp.asarray(target[rows])}
        return out


def all_linear_mask(cfg) -> dict:
    """Mask of every attention and MLP matrix (full fine-tuning)."""
    return components.trainable_mask(components.nonlocalized(cfg), cfg)


def split_forget(forget: list) -> tuple[list, list]:
    """(relearn half, held-out half): first half (int) and the rest, in order."""
    if len(forget) < 2:
        raise JaxeditError(f"the relearning attack splits the forget set in half: it needs ≥ 2 facts, got {len(forget)}")
    k = len(forget) // 2
    return forget[:k], forget[k:]


def relearn(model, params, forget: list, maintain_train: list, maintain_test: list,
            settings: RelearnSettings = RelearnSettings()) -> dict[str, float]:
    """Attack `params` (the edited model); metrics 'relearn/{step}/{fmt}/{forget|edit|maintain}[_argmax]'.

    forget: the edited facts (split in half here); maintain_train: facts mixed into training with
    their true sport; maintain_test: where maintain accuracy is measured.
    """
    train_half, test_half = split_forget(forget)
    batches = FactBatches(model.tokenizer, {"forget": (train_half, "sport"), "maintain": (maintain_train, "sport")},
                          settings.batch_size, settings.steps * settings.accumulate, settings.seed)
    if settings.lora_rank:
        lora = LoraSpec(settings.lora_rank, settings.lora_alpha)
        trainable, frozen = init_lora(params, lora.rank, jax.random.key(settings.seed)), params
        tmask = jax.tree.map(lambda a: np.ones((1,) * a.ndim, bool), trainable)
    else:
        lora, mask = None, all_linear_mask(model.cfg)
        trainable, frozen = split_trainable(params, mask)
        trainable = jax.tree.map(jnp.copy, trainable)  # train_step donates it; the edited params stay valid
        tmask = trainable_part(mask)
    optimizer = masked_adamw(tmask, cosine_schedule(settings.lr, settings.steps), 0.0, None, settings.accumulate)
    opt_state = optimizer.init(trainable)
    weights = LossWeights(forget=1.0, maintain=1.0, lm=0.0)
    out = {}

    def evaluate(step):
        metrics = evaluate_sports(model, test_half, maintain_test, params=full_params(trainable, frozen, lora),
                                  formats=settings.formats)
        out.update({f"relearn/{step}/{k}": v for k, v in metrics.items()})

    bar = tqdm(range(settings.steps), file=sys.stderr, disable=not settings.progress, desc="relearn")
    for step in bar:
        if step in settings.eval_at:
            evaluate(step)
        for micro in range(settings.accumulate):
            trainable, opt_state, _ = train_step(trainable, frozen, opt_state, batches(step * settings.accumulate + micro),
                                                 model.cfg, weights, optimizer, tmask, None, lora)
    if settings.steps in settings.eval_at:
        evaluate(settings.steps)
    return out
