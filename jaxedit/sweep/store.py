"""The run directory of a sweep: atomic per-unit results, a manifest, and resumption.

Layout of `<output>/<name>/`:
  manifest.json          config, versions, git revision, devices, timings
  prep/<prep id>.json    shared preparation (data split, localization scores, before-edit metrics)
  units/<unit id>.json   one finished unit's row (written by tmp file + rename: complete or absent)
  checkpoints/<unit id>/ orbax checkpoints of in-flight training (removed when the unit is written)
  results.jsonl          every row, rebuilt from units/ when the sweep ends
A restarted sweep skips units whose file exists, so a kill at any moment loses only the unit in
flight (and resumes its training from the last checkpoint), and never repeats a written one.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from jaxedit.errors import JaxeditError
from jaxedit.io import atomic_write, git_revision

PACKAGES = ("jaxedit", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tokenizers")


def write_json(path: Path, value) -> None:
    """`value` as indented, key-sorted JSON (arrays as lists), written atomically."""
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found | {"python": platform.python_version()}


class RunStore:
    """Results of one sweep under `root` (see the module doc)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def open(self, config: dict, devices: dict) -> bool:
        """Create the run directory or check it belongs to `config`; True when resuming."""
        if self.manifest_path.is_file():
            manifest = json.loads(self.manifest_path.read_text())
            if manifest.get("config") != json.loads(json.dumps(config, default=_jsonable)):
                raise JaxeditError(f"{self.root} holds a sweep with a different config: pass another name=... "
                                   f"or output=..., or remove the directory")
            return True
        write_json(self.manifest_path, {"config": config, "versions": versions(), "git_revision": git_revision(),
                                        "devices": devices, "platform": platform.platform()})
        return False

    def update_manifest(self, **fields) -> None:
        manifest = json.loads(self.manifest_path.read_text())
        write_json(self.manifest_path, manifest | fields)

    def unit_path(self, unit_id: str) -> Path:
        return self.root / "units" / f"{unit_id}.json"

    def done(self, unit_id: str) -> bool:
        return self.unit_path(unit_id).is_file()

    def write_unit(self, unit_id: str, row: dict) -> None:
        write_json(self.unit_path(unit_id), row)

    def prep_path(self, prep_id: str) -> Path:
        return self.root / "prep" / f"{prep_id}.json"

    def checkpoint_dir(self, unit_id: str) -> Path:
        return self.root / "checkpoints" / unit_id

    def rows(self) -> list[dict]:
        """Every finished unit's row, sorted by unit id."""
        return [json.loads(p.read_text()) for p in sorted((self.root / "units").glob("*.json"))]

    def write_results(self) -> Path:
        path = self.root / "results.jsonl"
        atomic_write(path, "".join(json.dumps(r, sort_keys=True, default=_jsonable) + "\n" for r in self.rows()))
        return path
