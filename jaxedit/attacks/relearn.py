"""Relearning attack (method.md §5.8): fine-tune the EDITED model on half the forget set, true answers.

The forget set is split in half (`Split.relearn_halves`; a whole sport: its trained and held-out
halves, §5.8); the first half is relearned with its TRUE answers (CE to the true answer's first
token; the paper's CounterFact script trained
towards the false targets, §10.1: not copied), mixed with maintain facts, and forget accuracy is
measured on the held-out second half at `eval_at` (paper: steps 0, 10 and 20; the task gives
data and metrics). Either LoRA on every linear layer (PEFT's
"all-linear": q, k, v, o, gate, up, down; r = 512, α = 32 in the paper) or full fine-tuning of
every attention and MLP matrix. AdamW lr 2e-4, weight decay 0, cosine over the steps, no clipping;
one step = `accumulate` micro-batches (paper: 8 × 4 relearn + 8 × 4 maintain). The paper's Pile
term is omitted (no corpus here) and LoRA dropout (0.05) is not modelled.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxedit.data.batching import PromptBatches
from jaxedit.edit.lora import init_lora
from jaxedit.edit.optim import AdamWSpec, split_trainable, trainable_part
from jaxedit.edit.train import LoraSpec, LossWeights, full_params, train_step
from jaxedit.errors import JaxeditError
from jaxedit.localize import components


class FollowSteps(tuple):
    """The default `RelearnSettings.eval_at`: (0, steps // 2, steps), derived again whenever steps changes."""


def follow_steps(steps: int) -> FollowSteps:
    return FollowSteps(sorted({0, steps // 2, steps}))


@dataclasses.dataclass(frozen=True)
class RelearnSettings:
    """§5.8 hyper-parameters (the paper's defaults); lora_rank=None means full fine-tuning of all linear weights.

    eval_at: the steps measured; the last must be `steps` (the reported result: forget after all
    relearning, §5.8). Unset, it follows steps (`follow_steps`: the paper's 0, 10, 20 for 20 steps).
    """

    enabled: bool = True  # False: the experiment runs no relearning attack
    lora_rank: int | None = 512
    lora_alpha: float = 32.0
    lr: float = 2e-4
    steps: int = 20
    eval_at: tuple[int, ...] = follow_steps(20)
    batch_size: int = 4
    accumulate: int = 8

    def __post_init__(self):
        if isinstance(self.eval_at, FollowSteps):
            object.__setattr__(self, "eval_at", follow_steps(self.steps))
        elif self.enabled and (any(s < 0 or s > self.steps for s in self.eval_at) or self.steps not in self.eval_at):
            raise JaxeditError(f"relearn.eval_at {list(self.eval_at)} must be steps from 0 to relearn.steps="
                               f"{self.steps} and include {self.steps} (the reported result): fix the list or "
                               "leave it unset")


def all_linear_mask(cfg) -> dict:
    """Mask of every attention and MLP matrix (full fine-tuning)."""
    return components.trainable_mask(components.nonlocalized(cfg), cfg)


def split_forget(forget: list) -> tuple[list, list]:
    """(relearn half, held-out half): first half (int) and the rest, in order."""
    if len(forget) < 2:
        raise JaxeditError(f"the relearning attack splits the forget set in half: it needs ≥ 2 facts, got {len(forget)}")
    k = len(forget) // 2
    return forget[:k], forget[k:]


def relearn(model, params, train_sets: dict, evaluate: Callable[[dict], dict],
            settings: RelearnSettings = RelearnSettings(), seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Attack `params` (the edited model); returns {'relearn/{step}/{metric}': value} at `settings.eval_at`.

    train_sets: {key: (prompts, target ids)} with the TRUE answers (`PromptBatches` sets, e.g. the
    relearn half of the forget set and maintain facts); evaluate(params) -> {metric: value}, measured
    on the held-out half and the maintain test facts (with LoRA, params carry the adapters as side paths,
    `lora.side_params`, as PEFT runs an unmerged adapter: no merged copy of the model per measurement).
    seed: batch order and LoRA init.
    """
    batches = PromptBatches(model.tokenizer, train_sets, settings.batch_size, settings.steps * settings.accumulate,
                            seed)
    if settings.lora_rank:
        lora = LoraSpec(settings.lora_rank, settings.lora_alpha)
        trainable, frozen = init_lora(params, lora.rank, jax.random.key(seed)), params
        tmask = jax.tree.map(lambda a: np.ones((1,) * a.ndim, bool), trainable)
    else:
        lora, mask = None, all_linear_mask(model.cfg)
        trainable, frozen = split_trainable(params, mask)
        trainable = jax.tree.map(jnp.copy, trainable)  # train_step donates it; the edited params stay valid
        tmask = trainable_part(mask)
    optimizer = AdamWSpec(settings.steps, 0, 0.0, None, settings.accumulate)
    opt_state = optimizer.init(trainable)
    weights = LossWeights(forget=1.0, maintain=1.0, lm=0.0)
    out = {}

    def measure(step):
        out.update({f"relearn/{step}/{k}": v for k, v in evaluate(full_params(trainable, frozen, lora)).items()})

    bar = tqdm(range(settings.steps), file=sys.stderr, disable=not progress, desc="relearn")
    for step in bar:
        if step in settings.eval_at:
            measure(step)
        for micro in range(settings.accumulate):
            trainable, opt_state, _ = train_step(trainable, frozen, opt_state, batches(step * settings.accumulate + micro),
                                                 model.cfg, weights, optimizer, tmask, settings.lr, None, lora)
    measure(settings.steps)  # always in eval_at: the reported result
    return out
