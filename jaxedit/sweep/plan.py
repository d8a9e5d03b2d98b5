"""`--plan`: per-device memory of a sweep's models under its mesh, from shapes alone (no weights).

A model's config comes from its local directory / registry name, or, for the paper's hub models
that are not downloaded, from `configs/models/<model>.json` (their public HF `config.json` fields).
The mesh may be larger than this machine: it is an `AbstractMesh` of `n_devices`.
"""

from __future__ import annotations

import json
import math

from jaxedit import sharding
from jaxedit.models.registry import paper_model
from jaxedit.errors import JaxeditError
from jaxedit.localize import components
from jaxedit.localize.fact_lookup import PAPER_FLU_LAYERS
from jaxedit.models import registry
from jaxedit.models.config import ModelConfig, config_from_hf, read_model_config
from jaxedit.sweep.config import CONFIG_DIR, SweepConfig
from jaxedit.sweep.memory import format_report, memory_report


def model_config(name: str) -> ModelConfig:
    """The ModelConfig of a registry name / directory, or of a paper model described in configs/models/."""
    path = CONFIG_DIR / "models" / f"{paper_model(name)}.json"
    if path.is_file():
        return config_from_hf(json.loads(path.read_text()))
    try:
        return read_model_config(registry.resolve(name))
    except JaxeditError as err:
        raise JaxeditError(f"no config for model {name!r} ({err}); or add configs/models/{paper_model(name)}.json") \
            from None


def plan(config: SweepConfig, n_devices: int | None = None) -> str:
    """Printable memory tables: full fine-tuning and the paper's FLU MLPs (sports) for each model."""
    sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if n_devices is None:
        if -1 in sizes:
            raise JaxeditError("the mesh has a -1 axis: pass --devices N to plan for N devices")
        n_devices = math.prod(sizes)
    mesh = sharding.abstract_mesh(sharding.MeshSpec(*sizes), n_devices)
    parts = []
    for name in config.models:
        cfg = model_config(name)
        layers = PAPER_FLU_LAYERS.get(paper_model(name), {}).get("sports")
        masks = {"full fine-tuning": None}
        if layers:
            masks[f"FLU MLPs {list(layers)}"] = components.trainable_mask(components.mlp_layers(cfg, layers), cfg)
        for label, mask in masks.items():
            report = memory_report(cfg, mesh, dtype=config.dtype, trainable_mask=mask,
                                   accumulate=config.train.accumulate)
            parts.append(f"{name}, {label}:\n{format_report(report)}")
    return "\n\n".join(parts)
