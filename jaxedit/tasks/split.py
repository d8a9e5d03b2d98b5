"""The fact sets of one experiment: what is edited, where edits are measured, what must be kept."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxedit.attacks.relearn import split_forget
from jaxedit.errors import JaxeditError

ORDERS = ("file", "seeded")  # `DataSettings.order`


@dataclasses.dataclass(frozen=True)
class Split:
    """forget: trained facts; forget_test: where forget/edit are measured (= forget, or the held-out half
    of a whole sport); maintain_train / maintain_test: other known facts (80/20); pool: few-shot
    examples (CounterFact MCQ); partitions: sequential-editing slices of `forget`."""

    forget: list
    forget_test: list
    maintain_train: list
    maintain_test: list
    pool: list = dataclasses.field(default_factory=list)
    partitions: tuple = ()
    n_known: int = 0
    n_candidates: int = 0

    def sizes(self) -> dict[str, int]:
        return {"n_forget": len(self.forget), "n_forget_test": len(self.forget_test),
                "n_maintain_train": len(self.maintain_train), "n_maintain_test": len(self.maintain_test),
                "n_known": self.n_known, "n_candidates": self.n_candidates}

    def relearn_halves(self) -> tuple[list, list]:
        """(relearned facts, held-out facts) of the attacks (§5.8).

        A held-out forget_test (whole sport): the trained half and the held-out half. Otherwise the
        forget set's first half and the rest (`relearn.split_forget`; seeded when the rows are).
        """
        if self.forget_test != self.forget:
            return list(self.forget), list(self.forget_test)
        return split_forget(list(self.forget))


def ordered(facts: list, order: str, seed: int) -> list:
    """`facts` in file order ('file') or permuted by np.random.default_rng(seed) ('seeded')."""
    if order == "file":
        return list(facts)
    if order == "seeded":
        return [facts[i] for i in np.random.default_rng(seed).permutation(len(facts))]
    raise JaxeditError(f"unknown fact order {order!r}: use one of {', '.join(ORDERS)}")


def cap_maintain(rest: list, max_maintain: int | None) -> tuple[list, list]:
    """(train, test): the first `max_maintain` of `rest` (all if None), first 80% (int) / last 20%."""
    rest = rest if max_maintain is None else rest[:max_maintain]
    k = int(0.8 * len(rest))
    return rest[:k], rest[k:]


def known_prefix(facts: list, need: int, is_known: Callable[[list], np.ndarray],
                 chunk: int = 64) -> tuple[list, int]:
    """(known facts, number checked): `facts` are checked in chunks until `need` are known or all are checked.

    is_known(rows) -> [len(rows)] bool. Stopping early keeps the filter cheap on large fact files;
    the first `need` known facts are those of filtering every fact.
    """
    kept, checked = [], 0
    for start in range(0, len(facts), chunk):
        rows = facts[start:start + chunk]
        kept += [f for f, k in zip(rows, is_known(rows)) if k]
        checked += len(rows)
        if len(kept) >= need:
            break
    return kept, checked
