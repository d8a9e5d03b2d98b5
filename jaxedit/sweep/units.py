"""The units of a sweep: models × seeds × grid points × localizations, each with a stable id.

A unit is one edit-evaluate-attack run. Units that share (model, seed) share one preparation
(data split, localization scores, before-edit evaluation); the grid varies any dotted config key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

from jaxedit.sweep.config import SweepConfig, with_values


@dataclasses.dataclass(frozen=True)
class Unit:
    model: str
    seed: int
    point: tuple[tuple[str, object], ...]  # the grid assignment, sorted by key
    localization: str

    @property
    def prep_id(self) -> str:
        """Id of the preparation this unit shares: depends on the model, seed and data-side grid keys."""
        data_keys = tuple((k, v) for k, v in self.point if k.split(".")[0] in ("data", "localize", "general_text"))
        return _slug(self.model) + f"__s{self.seed}" + (f"__{_digest(data_keys)}" if data_keys else "")

    @property
    def id(self) -> str:
        point = f"__{_digest(self.point)}" if self.point else ""
        return f"{_slug(self.model)}__s{self.seed}{point}__{self.localization}"

    def config(self, base: SweepConfig) -> SweepConfig:
        return with_values(base, dict(self.point))

    def labels(self) -> dict:
        return {"unit": self.id, "model": self.model, "seed": self.seed, "localization": self.localization,
                **{k: v for k, v in self.point}}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text.strip("/").split("/")[-1])


def _digest(items) -> str:
    text = json.dumps(list(items), sort_keys=True, default=str)
    readable = "_".join(f"{k.split('.')[-1]}{v}" for k, v in items)
    if len(readable) <= 40 and all(c.isalnum() or c in "_-.+" for c in readable):
        return readable
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def expand(config: SweepConfig) -> list[Unit]:
    """Every unit of the sweep, in a deterministic order (preparations grouped together)."""
    grid = config.grid or {}
    keys = sorted(grid)
    points = [tuple(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [()]
    return [Unit(model, seed, point, loc) for model in config.models for seed in config.seeds
            for point in points for loc in config.localizations]
