"""The units of a sweep: models × seeds × grid points × localizations, each with a stable id.

A unit is one edit-evaluate-attack run. Units that share (model, seed) and the grid's values of
the keys a preparation reads (`PREP_SECTIONS`) share one preparation (data split, localization
scores, before-edit evaluation, general text); the grid varies any dotted config key. A unit id
starts with its model's directory name, followed by a digest of the model as given when two models
of the sweep share that name (`/x/a/model` and `/x/b/model`), so no unit id stands for two units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from jaxedit.sweep.config import SweepConfig, grid_points, with_values

PREP_SECTIONS = ("data", "localize", "general_text", "eval")  # what `experiment.prepare` reads


@dataclasses.dataclass(frozen=True)
class Unit:
    model: str
    seed: int
    point: tuple[tuple[str, object], ...]  # the grid assignment, sorted by key
    localization: str
    model_key: str  # the model's part of the ids (`model_keys`)

    @property
    def prep_id(self) -> str:
        """Id of the preparation this unit shares: the model, seed and grid values of `PREP_SECTIONS` keys."""
        data_keys = tuple((k, v) for k, v in self.point if k.split(".")[0] in PREP_SECTIONS)
        return self.model_key + f"__s{self.seed}" + (f"__{_digest(data_keys)}" if data_keys else "")

    @property
    def id(self) -> str:
        point = f"__{_digest(self.point)}" if self.point else ""
        return f"{self.model_key}__s{self.seed}{point}__{self.localization}"

    def config(self, base: SweepConfig) -> SweepConfig:
        return with_values(base, dict(self.point))

    def labels(self) -> dict:
        return {"unit": self.id, "model": self.model, "seed": self.seed, "localization": self.localization,
                **{k: v for k, v in self.point}}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text.strip("/").split("/")[-1])


def model_keys(models) -> dict[str, str]:
    """Model (as given) → its part of unit ids: the directory name, plus a digest of the model where names collide."""
    slugs = {model: _slug(model) for model in models}
    shared = {slug for slug in slugs.values() if list(slugs.values()).count(slug) > 1}
    return {model: slug + (f"-{hashlib.sha256(model.encode()).hexdigest()[:8]}" if slug in shared else "")
            for model, slug in slugs.items()}


def _digest(items) -> str:
    text = json.dumps(list(items), sort_keys=True, default=str)
    readable = "_".join(f"{k.split('.')[-1]}{v}" for k, v in items)
    if len(readable) <= 40 and all(c.isalnum() or c in "_-.+" for c in readable):
        return readable
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def expand(config: SweepConfig) -> list[Unit]:
    """Every unit of the sweep, in a deterministic order (preparations grouped together)."""
    keys = model_keys(config.models)
    return [Unit(model, seed, point, loc, keys[model]) for model in config.models for seed in config.seeds
            for point in grid_points(config) for loc in config.localizations]
