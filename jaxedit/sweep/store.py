"""The run directory of a sweep: atomic per-unit results, a manifest, and resumption.

Layout of `<output>/<name>/`:
  manifest.json          config, code (git revision, uncommitted changes, package versions), devices, timings
  prep/<prep id>.json    shared preparation (data split, localization scores, before-edit metrics)
  units/<unit id>.json   one finished unit's row (written by tmp file + rename: complete or absent)
  checkpoints/<unit id>/ checkpoints of in-flight training (`edit.checkpoints`) (removed when the unit is written)
  results.jsonl          every row, rebuilt from units/ when the sweep ends
A restarted sweep skips units whose file exists, so a kill at any moment loses only the unit in
flight (and resumes its training from the last checkpoint), and never repeats a written one. It
resumes only with the config and the code (`provenance`) that made the directory, unless asked to
continue with other code (recorded in the manifest's `resumed_anyway`).
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from jaxedit.errors import JaxeditError
from jaxedit.io import atomic_write, git_revision, source_changes

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


def provenance() -> dict:
    """The code a run is made by: git revision, a digest of uncommitted changes (or None), package versions."""
    return {"git_revision": git_revision(), "source_changes": source_changes(), "versions": versions()}


def _differences(then: dict, now: dict) -> list[str]:
    """'what then → now' for each provenance field and package version that differs."""
    def flat(code: dict) -> dict:
        return {k: v for k, v in code.items() if k != "versions"} | (code.get("versions") or {})

    old, new = flat(then), flat(now)
    return [f"{key} {old.get(key)} → {new.get(key)}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


class RunStore:
    """Results of one sweep under `root` (see the module doc)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def open(self, config: dict, devices: dict, resume_anyway: bool = False) -> bool:
        """Create the run directory or check it belongs to `config` and this code; True when resuming.

        resume_anyway: continue a directory made by other code (noted in the manifest) instead of refusing.
        """
        code = provenance()
        if self.manifest_path.is_file():
            manifest = json.loads(self.manifest_path.read_text())
            if manifest.get("config") != json.loads(json.dumps(config, default=_jsonable)):
                raise JaxeditError(f"{self.root} holds a sweep with a different config: pass another name=... "
                                   f"or output=..., or remove the directory")
            changed = _differences({k: manifest.get(k) for k in code}, code)
            if changed and not resume_anyway:
                raise JaxeditError(f"{self.root} was made by other code ({'; '.join(changed)}): rerun it with "
                                   "that code, pass another name=... or output=..., or pass --resume-anyway to "
                                   "continue it with this code")
            if changed:
                self.update_manifest(resumed_anyway=manifest.get("resumed_anyway", []) + [code])
            return True
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise JaxeditError(f"cannot create the run directory {self.root} ({err.strerror}): "
                               "pass output=... a folder you can write to") from None
        write_json(self.manifest_path, {"config": config, **code, "devices": devices, "platform": platform.platform()})
        return False

    def has_results(self) -> bool:
        """Whether anything was computed here: a preparation, a unit, a training checkpoint."""
        return any(any(self.root.glob(pattern)) for pattern in ("prep/*.json", "units/*.json", "checkpoints/**/step_*"))

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
