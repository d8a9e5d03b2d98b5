"""Labelled score arrays saved as NPZ + JSON sidecar (never pickle), and heatmap PNGs.

`ScoreArray(values, axes, method, model, data_hash, git_sha, labels, meta)`: `save("out/ap")`
writes `out/ap.npz` (the array only) and `out/ap.json` (everything else); `ScoreArray.load`
reads both back. `save_heatmap` draws a 2-D score (layer × position, layer × head) with
matplotlib's Agg canvas, without touching pyplot's global state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.io import git_revision

FORMAT = "jaxedit.score_array/1"


def data_hash(*items) -> str:
    """sha256 (hex, 16 chars) of arrays (dtype, shape, bytes) and strings / lists of strings, in order."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, str):
            h.update(b"s" + item.encode())
        elif isinstance(item, (list, tuple)) and all(isinstance(x, str) for x in item):
            h.update(b"l" + json.dumps(list(item)).encode())
        else:
            a = np.ascontiguousarray(np.asarray(item))
            h.update(f"a{a.dtype.str}{a.shape}".encode() + a.tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ScoreArray:
    """A score array with named axes and provenance."""

    values: np.ndarray
    axes: tuple[str, ...]  # one name per dimension, e.g. ("layer", "head")
    method: str  # e.g. "attribution_patching", "path_patching/extraction_heads"
    model: str = ""
    data_hash: str = ""
    git_sha: str = dataclasses.field(default_factory=git_revision)
    labels: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # optional tick labels per axis
    meta: dict = dataclasses.field(default_factory=dict)  # JSON-serializable extras (threshold, seed, …)

    def __post_init__(self):
        values = np.asarray(self.values)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "axes", tuple(self.axes))
        if values.dtype == object:
            raise JaxeditError("score values must be a numeric array, not objects")
        if len(self.axes) != values.ndim:
            raise JaxeditError(f"{len(self.axes)} axis names {self.axes} for a {values.ndim}-D array: name every axis")
        for axis, names in self.labels.items():
            if axis not in self.axes or len(names) != values.shape[self.axes.index(axis)]:
                raise JaxeditError(f"labels for axis {axis!r} do not match the array's axes {self.axes} / shape {values.shape}")

    def sidecar(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "values"}
        return {"format": FORMAT, **fields, "axes": list(self.axes), "shape": list(self.values.shape),
                "dtype": self.values.dtype.str}

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write `path`.npz and `path`.json (a .npz/.json suffix on `path` is dropped); returns both paths."""
        npz, sidecar = _paths(path)
        npz.parent.mkdir(parents=True, exist_ok=True)
        with open(npz, "wb") as f:
            np.savez(f, values=self.values)
        sidecar.write_text(json.dumps(self.sidecar(), indent=1, sort_keys=True))
        return npz, sidecar

    @classmethod
    def load(cls, path: str | Path) -> ScoreArray:
        npz, sidecar = _paths(path)
        if not npz.is_file() or not sidecar.is_file():
            raise JaxeditError(f"missing {npz.name} or {sidecar.name} in {npz.parent}: save both with ScoreArray.save")
        meta = json.loads(sidecar.read_text())
        if meta.get("format") != FORMAT:
            raise JaxeditError(f"{sidecar} is not a {FORMAT} sidecar")
        with np.load(npz, allow_pickle=False) as data:
            values = data["values"]
        fields = {f.name for f in dataclasses.fields(cls)} - {"values"}
        return cls(values, **{k: v for k, v in meta.items() if k in fields})


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".npz", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".npz"), path.with_name(path.name + ".json")


def save_heatmap(score: ScoreArray, path: str | Path, *, title: str | None = None, cmap: str = "RdBu_r") -> Path:
    """PNG heatmap of a 1-D or 2-D score: first axis down the rows (e.g. layer), second across.

    Colours are centred on 0 (signed scores); tick labels come from `score.labels` when present.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = score.values.astype(np.float64)
    if values.ndim not in (1, 2):
        raise JaxeditError(f"a heatmap needs a 1-D or 2-D score, got axes {score.axes}: select or reduce axes first")
    axes = score.axes if values.ndim == 2 else score.axes + ("",)
    values = values.reshape(values.shape[0], -1)
    rows, cols = values.shape
    fig = Figure(figsize=(min(2 + 0.35 * cols, 24), min(1.5 + 0.3 * rows, 24)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = np.abs(values[np.isfinite(values)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(values, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_ylabel(axes[0])
    ax.set_xlabel(axes[1])
    for axis, set_ticks, n in ((axes[0], (ax.set_yticks, ax.set_yticklabels), rows),
                               (axes[1], (ax.set_xticks, ax.set_xticklabels), cols)):
        if axis in score.labels:
            set_ticks[0](range(n))
            set_ticks[1](score.labels[axis], fontsize=7, rotation=90 if set_ticks[0] == ax.set_xticks else 0)
    if not axes[1]:
        ax.set_xticks([])  # a 1-D score has no second axis to label
    ax.set_title(title or f"{score.method} {score.model}".strip())
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
