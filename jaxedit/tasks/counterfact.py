"""The CounterFact tasks (method.md §1.3, §4.5, §6.5): edit facts to their `target_false`.

- 'counterfact': forget = the first n_forget known facts (`first_{n}_unsplit`, or `data.split`);
  maintain = the other known facts (80/20), few-shot MCQ pool = the last `pool_size` known facts.
  "First" and "last" are in `data.fact_order`: file order, or permuted by the seed.
- 'counterfact_sequential' (§4.5): the forget set is edited in 4 partitions, one after the other,
  each with its own localization and a fresh optimizer; metrics cover every forget fact.
Relearning uses the TRUE targets (the paper's script trained towards target_false, §10.1).
Every target is scored by its first token (§1.3).
"""

from __future__ import annotations

import numpy as np

from jaxedit.data import counterfact as cf
from jaxedit.data.batching import first_tokens
from jaxedit.errors import JaxeditError
from jaxedit.eval.counterfact_eval import evaluate_counterfact, known_facts
from jaxedit.localize.pipeline import LocalizationInputs
from jaxedit.tasks.base import DataSettings, EvalSettings
from jaxedit.tasks.split import Split, cap_maintain, ordered

COLUMNS = {  # §6.5 column -> metric key
    "forget": "after/fact/forget", "edit": "after/fact/edit", "maintain": "after/fact/maintain",
    "mcq_forget": "after/mcq/forget", "mcq_edit": "after/mcq/edit", "mcq_maintain": "after/mcq/maintain",
    "paraphrase": "after/paraphrase/forget", "paraphrase_edit": "after/paraphrase/edit",
    "neighborhood": "after/neighborhood/forget", "neighborhood_edit": "after/neighborhood/edit",
}
SELECTION = ("fact/forget", "fact/maintain", "fact/edit")
N_PARTITIONS = 4  # §4.5


class CounterFactTask:
    """One of the CounterFact tasks of the module doc on a list of `CounterFactFact`s (a `tasks.base.Task`)."""

    columns = COLUMNS
    selection = SELECTION
    NAMES = ("counterfact", "counterfact_sequential")

    def __init__(self, facts: list, sequential: bool = False, split: str | None = None, n_shots: int = 8,
                 seed: int = 0):
        self.facts, self.sequential, self.split_name, self.n_shots, self.seed = facts, sequential, split, n_shots, seed
        self.name = "counterfact_sequential" if sequential else "counterfact"
        self.pool: list = []
        self.forget: list = []  # the last split's forget set (its slices name the paper's FLU settings)

    @classmethod
    def build(cls, name: str, data: DataSettings, evaluation: EvalSettings) -> CounterFactTask:
        return cls(cf.load_counterfact(data.path, data.mcq_path), sequential=name == "counterfact_sequential",
                   split=data.split, n_shots=evaluation.n_shots)

    def split(self, model, data: DataSettings, seed: int) -> Split:
        """Keep the facts with P(first token of target_true) ≥ data.known_threshold; order and split them."""
        n_forget, threshold, max_maintain, pool_size = data.n_forget, data.known_threshold, data.max_maintain, \
            data.pool_size
        kept = ordered(known_facts(model, self.facts, threshold), data.fact_order, seed)
        if self.sequential and n_forget % N_PARTITIONS:
            raise JaxeditError(f"sequential editing splits the forget set into {N_PARTITIONS} partitions: "
                               f"make data.n_forget a multiple of {N_PARTITIONS} (paper: 64), got {n_forget}")
        name = self.split_name or f"first_{n_forget}_unsplit"
        if len(kept) < n_forget + pool_size + 5:
            raise JaxeditError(f"the model knows {len(kept)} of {len(self.facts)} CounterFact facts; {n_forget} "
                               f"forget + {pool_size} pool + ≥ 5 maintain are needed: pass more facts, lower "
                               f"data.n_forget / data.pool_size or data.known_threshold")
        parts = cf.splits(kept, name, pool_size)
        self.pool = list(parts.pool)
        train, held = cap_maintain(list(parts.maintain_train + parts.maintain_test), max_maintain)
        forget = self.forget = list(parts.forget_train)
        size = len(forget) // N_PARTITIONS
        partitions = tuple(tuple(forget[i * size:(i + 1) * size]) for i in range(N_PARTITIONS)) \
            if self.sequential else ()
        return Split(forget, list(parts.forget_test), train, held, self.pool, partitions, n_known=len(kept),
                     n_candidates=len(self.facts))

    def localization_inputs(self, model, facts: list) -> LocalizationInputs:
        """answer = first token of target_true [N], other = first token of target_false [N,1]; no class labels."""
        true = first_tokens(model.tokenizer, [f.target_true for f in facts])
        false = first_tokens(model.tokenizer, [f.target_false for f in facts])
        return LocalizationInputs([f.prompt for f in facts], [f.subject.strip() for f in facts], true, false[:, None],
                                  setting=self._paper_setting(facts))

    def _paper_setting(self, facts: list) -> str | None:
        """'counterfact_{a}_{b}' when `facts` are rows a..b-1 of the forget set (the FLU settings), else None."""
        for a in range(len(self.forget)):
            if self.forget[a:a + len(facts)] == list(facts):
                return f"counterfact_{a}_{a + len(facts)}"
        return None

    def train_sets(self, tokenizer, split: Split) -> dict:
        """{'forget': prompt → target_false, 'forget_true': prompt → target_true, 'maintain': prompt → target_true}
        (first tokens)."""
        return cf.training_sets(tokenizer, split.forget, split.maintain_train)

    def relearn_sets(self, tokenizer, facts: list, maintain: list) -> dict:
        """The relearning attack's data: `facts` and maintain facts with their TRUE targets (§10.1 fixed)."""
        true = lambda rows: first_tokens(tokenizer, [f.target_true for f in rows]) if rows else np.zeros(0, np.int32)  # noqa: E731
        return {"forget": ([f.prompt for f in facts], true(facts)), "maintain": ([f.prompt for f in maintain],
                                                                                 true(maintain))}

    def evaluate(self, model, forget: list, maintain: list, params=None) -> dict:
        return evaluate_counterfact(model, forget, maintain, self.pool, params=params, seed=self.seed,
                                    n_shots=self.n_shots)

    def relearn_evaluate(self, model, forget: list, maintain: list, params) -> dict:
        return evaluate_counterfact(model, forget, maintain, self.pool, params=params, seed=self.seed,
                                    n_shots=self.n_shots, formats=("fact",))

    def latent(self, model, split: Split, params, steps: int, seed: int) -> dict:
        return {}  # §5.6 probes the athlete settings only

    def soft_prompt_data(self, facts: list) -> tuple[list[str], list[str]]:
        return [f.prompt for f in facts], [f.target_true for f in facts]

    def soft_prompt_metrics(self, model, params, adversary, held_out: list, maintain: list) -> dict:
        """Per restart [R]: full-vocab P(target_true) / P(target_false) on held-out facts, P(true) on maintain."""
        from jaxedit.attacks.soft_prompt import attacked_token_probs

        facts = held_out + maintain
        prompts = [f.prompt for f in facts]
        true = attacked_token_probs(model, params, adversary, prompts,
                                    first_tokens(model.tokenizer, [f.target_true for f in facts]))  # [R,N]
        false = attacked_token_probs(model, params, adversary, prompts[:len(held_out)],
                                     first_tokens(model.tokenizer, [f.target_false for f in held_out]))
        n = len(held_out)
        return {"forget": true[:, :n].mean(-1), "edit": false.mean(-1), "maintain": true[:, n:].mean(-1)}
