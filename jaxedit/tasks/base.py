"""What the experiment asks of a task (`Task`), and the settings a task is built from.

A task owns its facts, prompts and metrics: which facts the model knows and how they split
(`split`), what localization reads (`localization_inputs`), what the edit and the relearning
attack train on, every evaluation, the latent probes and the soft-prompt attack's data and
metrics. `jaxedit.experiment` calls nothing else. Fact sets are lists of the task's fact records;
training sets are `{key: (prompts [N] str, target token ids [N])}` (`data.batching.PromptBatches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Protocol

from jaxedit.errors import JaxeditError
from jaxedit.localize.pipeline import LocalizationInputs
from jaxedit.tasks.split import ORDERS, Split


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Which facts: the file, how many to edit, what counts as known, how many to maintain, in which order.

    order 'file': every split is taken in the file's order (the paper's: its first n_forget known
    rows, maintain 80/20 in order, relearning halves in order); 'seeded': the rows are permuted by
    the run's seed first, so the seed draws the forget set from the known facts, the maintain split
    and the relearning halves; null: 'file' for a given `path`, 'seeded' for the built-in facts.
    """

    path: str | None = None  # null: the built-in set of the task
    mcq_path: str | None = None  # CounterFact MCQ parquet (prompt_id join); null: the options in the data
    n_forget: int = 16
    split: str | None = None  # sports whole-sport split (e.g. basketball) or CounterFact split name
    known_threshold: float = 0.5
    max_maintain: int | None = 120  # cap on maintain facts kept (train 80% / test 20%: 96 / 24); null: all
    pool_size: int = 8  # CounterFact few-shot pool (the last known rows; paper: 64)
    order: str | None = None  # 'file' | 'seeded' | null (see the class doc)

    def __post_init__(self):
        if self.order not in (None, *ORDERS):
            raise JaxeditError(f"data.order {self.order!r}: use one of {', '.join(ORDERS)} or null")

    @property
    def fact_order(self) -> str:
        """`order`, with null resolved: 'file' when a data file is given, else 'seeded'."""
        return self.order or ("file" if self.path else "seeded")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What is measured besides the task's prompt formats: probes (§5.6), MMLU, the MCQ shots."""

    probes: bool = True
    probe_steps: int = 100  # optimizer steps of each latent-knowledge probe
    mmlu_dir: str | None = None  # a local MMLU directory (standard CSV layout); null: no MMLU
    mmlu_limit: int | None = 20  # questions per subject
    n_shots: int = 8  # CounterFact MCQ few-shot examples


class Task(Protocol):
    """The interface `jaxedit.experiment` uses (see the module doc); `SportsTask` and `CounterFactTask` implement it."""

    name: str
    columns: ClassVar[Mapping[str, str]]  # report column -> metric key ('after/fact/forget', …)
    selection: ClassVar[tuple[str, str, str]]  # §4.4 score's (forget, maintain, edit) metric keys

    @classmethod
    def build(cls, name: str, data: DataSettings, evaluation: EvalSettings) -> Task:
        """The task `name` with its facts loaded (cheap checks of the data happen here)."""

    def split(self, model, data: DataSettings, seed: int) -> Split:
        """Keep the facts the model knows and split them into forget / maintain (/ pool, partitions).

        seed: the row permutation when `data.fact_order` is 'seeded' (`split.ordered`)."""

    def localization_inputs(self, model, facts: list) -> LocalizationInputs:
        """Prompts, subjects, answers and competing answers of `facts` for localization (§3)."""

    def train_sets(self, tokenizer, split: Split) -> dict:
        """The edit's training sets: {'forget': → new answer, 'forget_true': the forget prompts → true answer (what
        `train.unlearn` lowers), 'maintain': → true answer}."""

    def relearn_sets(self, tokenizer, facts: list, maintain: list) -> dict:
        """The relearning attack's sets: `facts` and `maintain` with their TRUE answers."""

    def evaluate(self, model, forget: list, maintain: list, params=None) -> dict[str, float]:
        """{'<format>/<metric>': value} in every prompt format of the task (params None: the model's)."""

    def relearn_evaluate(self, model, forget: list, maintain: list, params) -> dict[str, float]:
        """The metrics the relearning attack is measured by (a few formats)."""

    def latent(self, model, split: Split, params, steps: int, seed: int) -> dict:
        """Latent-knowledge probe results (§5.6), or {} where the task has none."""

    def soft_prompt_data(self, facts: list) -> tuple[list[str], list[str]]:
        """(prompts, true answer strings) the soft-prompt adversary trains on."""

    def soft_prompt_metrics(self, model, params, adversary, held_out: list, maintain: list) -> dict:
        """Per restart [R]: {'forget', 'edit', 'maintain'} under the trained adversary."""
