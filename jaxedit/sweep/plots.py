"""The sweep report's figures (matplotlib, Agg canvas): bars, the §6 spider plot, relearning curves, probes by layer.

Every function takes by_loc = {localization: [rows over seeds]} in the order to draw, writes one PNG
and returns its `Figure` (whose artists hold the plotted numbers), or None when the rows lack the data.
Means and 95% intervals over seeds come from `stats.mean_interval`; `left_out` columns (not informative
on the model, `report.not_informative`) are not drawn and are named in a note under the figure.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxedit.localize.components import PAPER_LOCALIZATIONS
from jaxedit.sweep.stats import mean_interval

SPIDER = (("edit", "edit"), ("maintain", "maintain"), ("MCQ edit", "mcq_edit"),
          ("1 − relearned forget", "relearn_forget"))  # (axis label, column) after general capability
GENERAL = (("after/mmlu", "MMLU"), ("after/general/accuracy", "general-text accuracy"))  # first present is used
RELEARN_KEY = re.compile(r"relearn/(\d+)/fact/(forget|maintain)$")

BEFORE = "before edit"  # the label of before-edit values (the summary table's first row, the probe plot's line)


def color(loc: str):
    """One colour per localization, the same in every figure."""
    index = PAPER_LOCALIZATIONS.index(loc) if loc in PAPER_LOCALIZATIONS else len(PAPER_LOCALIZATIONS)
    return colormaps["tab10"](index % 10)


def _figure(figsize, **subplot) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(**subplot)


def _save(fig: Figure, path: Path, note: str = "") -> Figure:
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="dimgray", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(path, dpi=110)
    return fig


def _left_out_note(left_out) -> str:
    return "Left out, not informative on this model (before-edit value at chance, †): " + ", ".join(left_out) \
        if left_out else ""


def _means(rows: list[dict], value) -> tuple[float, float]:
    """mean_interval over seeds of value(row) (None where the row lacks it)."""
    return mean_interval([value(r) for r in rows])


def _number(row: dict, key: str):
    value = row.get(key)
    return value if isinstance(value, (int, float)) else None


def bar_plot(by_loc: dict, columns, path: Path, title: str, left_out=()) -> Figure:
    """Grouped bars: one group per informative column, one bar per localization (mean, 95% whiskers)."""
    columns = [c for c in columns if c not in left_out]
    fig, ax = _figure((max(8, 1.1 * len(columns) + 2), 4.8))
    width = 0.8 / len(by_loc)
    for i, (loc, rows) in enumerate(by_loc.items()):
        cells = [_means(rows, lambda r: _number(r, c)) for c in columns]
        errors = [0 if np.isnan(h) else h for _, h in cells]
        ax.bar(np.arange(len(columns)) + i * width, [m for m, _ in cells], width, yerr=errors, capsize=2,
               label=loc, color=color(loc))
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("probability / accuracy (mean over seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{title}: metrics after editing (whiskers: 95% t-interval over seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path, _left_out_note(left_out))


def spider_axes(rows: list[dict], left_out=()) -> list[tuple[str, str]]:
    """The §6 spider axes present in rows and informative: (label, column), general capability first."""
    general = [(label, key) for key, label in GENERAL if any(_number(r, key) is not None for r in rows)][:1]
    axes = [(f"general capability ({label})", key) for label, key in general] + list(SPIDER)
    return [(label, c) for label, c in axes if c not in left_out and any(_number(r, c) is not None for r in rows)]


def spider_value(row: dict, column: str):
    """A row's value on a spider axis: higher is better (relearned forget is flipped to 1 − it)."""
    value = _number(row, column)
    return None if value is None else (1 - value if column == "relearn_forget" else value)


def spider_plot(by_loc: dict, path: Path, title: str, left_out=()) -> Figure | None:
    """§6's spider plot: one polygon per localization over `spider_axes` (means over seeds)."""
    axes = spider_axes([r for rows in by_loc.values() for r in rows], left_out)
    if len(axes) < 3:
        return None
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False)
    fig, ax = _figure((8, 8), projection="polar")
    for loc, rows in by_loc.items():
        values = np.nan_to_num([_means(rows, lambda r: spider_value(r, c))[0] for _, c in axes])
        closed = np.append(angles, angles[0]), np.append(values, values[0])
        ax.plot(*closed, label=loc, linewidth=1.4, color=color(loc))
        ax.fill(*closed, alpha=0.06, color=color(loc))
    ax.set_xticks(angles, [label for label, _ in axes], fontsize=8)
    ax.tick_params(axis="x", pad=12)
    ax.set_rlabel_position(np.degrees(angles[1]) / 2)  # radial labels between the first two axes
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: higher is better on every axis (means over seeds)", fontsize=10, pad=28)
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return _save(fig, path, _left_out_note([c for c in left_out if c in dict(SPIDER).values()]))


def relearn_steps(rows: list[dict], metric: str) -> list[int]:
    """The relearning steps some row measured `metric` (forget / maintain) at, ascending."""
    found = {int(m[1]) for r in rows for k in r if (m := RELEARN_KEY.match(k)) and m[2] == metric}
    return sorted(found)


def _band(ax, x, rows: list[dict], value, loc: str):
    """Mean over seeds of value(row, x_i) at each x, its 95% interval shaded."""
    cells = np.array([_means(rows, lambda r: value(r, xi)) for xi in x], np.float64).reshape(-1, 2)
    mean, half = cells[:, 0], np.nan_to_num(cells[:, 1])
    ax.plot(x, mean, marker="o", markersize=3, label=loc, color=color(loc))
    ax.fill_between(x, mean - half, mean + half, alpha=0.15, color=color(loc), linewidth=0)


def relearn_plot(by_loc: dict, path: Path, title: str) -> Figure | None:
    """Relearning curves: held-out forget (left) and maintain (right) P(true) against step, one line per loc."""
    rows = [r for group in by_loc.values() for r in group]
    if not relearn_steps(rows, "forget"):
        return None
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    for i, (metric, label) in enumerate((("forget", "held-out forget facts"), ("maintain", "maintain facts"))):
        ax = fig.add_subplot(1, 2, i + 1)
        steps = relearn_steps(rows, metric)
        for loc, group in by_loc.items():
            _band(ax, steps, group, lambda r, s: _number(r, f"relearn/{s}/fact/{metric}"), loc)
        ax.set_xticks(steps)
        ax.set_xlabel("relearning step")
        ax.set_ylabel(f"P(true answer), {label}")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{metric} during relearning", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{title}: relearning attack (mean over seeds, band: 95% t-interval)", fontsize=10)
    return _save(fig, path)


def _layer_value(row: dict, key: str, layer: int):
    values = row.get(key)
    return values[layer] if isinstance(values, list) and layer < len(values) else None


def probe_plot(by_loc: dict, path: Path, title: str, key: str = "probe_ground_truth") -> Figure | None:
    """Probe accuracy on the edited facts' true answer by layer, one line per localization and one before the edit
    (`before/{key}`, the same probe fit on the original params), means over seeds."""
    n_layers = max((len(r[key]) for rows in by_loc.values() for r in rows if isinstance(r.get(key), list)),
                   default=0)
    if not n_layers:
        return None
    fig, ax = _figure((8, 4.5))
    for loc, rows in by_loc.items():
        _band(ax, np.arange(n_layers), rows, lambda r, layer: _layer_value(r, key, layer), loc)
    seeds = list({r["seed"]: r for rows in by_loc.values() for r in rows}.values())  # before-edit values: one per seed
    if any(isinstance(r.get(f"before/{key}"), list) for r in seeds):
        _band(ax, np.arange(n_layers), seeds, lambda r, layer: _layer_value(r, f"before/{key}", layer), BEFORE)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (residual stream entering it; 0 = embeddings)")
    ax.set_ylabel("probe predicts the original answer\n(fraction of forget facts)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"{title}: latent knowledge before and after editing, {key} (mean over seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path)
