"""The report of a sweep: §6-style tables aggregated over seeds, plots, and a Markdown page.

`report/summary.md` links everything: one table per (model, grid point) with a row per
localization and the task's §6 columns (mean over seeds, ± the 95% t-interval half-width when
there are several seeds), the §4.4 selection (best grid point per localization), timings,
bar and spider plots of the metrics, and heatmaps of the localization scores.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxedit.localize.artifacts import ScoreArray, save_heatmap
from jaxedit.localize.components import PAPER_LOCALIZATIONS
from jaxedit.io import atomic_write
from jaxedit.tasks import task_class

ATTACK_COLUMNS = ("probe_gt_last", "relearn_forget", "relearn_maintain", "softprompt_forget", "softprompt_maintain",
                  "after/general/kl", "after/mmlu", "selection_score")  # after the task's own columns
HEADLINE = ("forget", "edit", "maintain", "mcq_forget", "relearn_forget")
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def headline(row: dict) -> list[str]:
    return [k for k in HEADLINE if isinstance(row.get(k), (int, float))]


def mean_interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval; nan for one value)."""
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1:
        return float(values[0]), float("nan")
    t = _T95.get(values.size - 1, 1.96)
    return float(values.mean()), float(t * values.std(ddof=1) / math.sqrt(values.size))


def _cell(values) -> str:
    mean, half = mean_interval(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def _hashable(value):
    """A grid value as a dict key (list-valued keys such as localize.flu_layers become tuples)."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _groups(rows: list[dict], grid_keys: list[str]) -> dict:
    """{(model, grid point): {localization: [rows over seeds]}}."""
    out = defaultdict(lambda: defaultdict(list))
    for row in rows:
        point = tuple((k, _hashable(row.get(k))) for k in grid_keys)
        out[row["model"], point][row["localization"]].append(row)
    return out


def _order(names) -> list[str]:
    return sorted(names, key=lambda n: PAPER_LOCALIZATIONS.index(n) if n in PAPER_LOCALIZATIONS else 99)


def summary_table(by_loc: dict, columns) -> str:
    head = "| localization | params (M) | seeds | " + " | ".join(columns) + " | time (s) |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    for loc in _order(by_loc):
        rows = by_loc[loc]
        cells = [_cell([r.get(c) for r in rows]) for c in columns]
        lines.append(f"| {loc} | {rows[0]['n_params'] / 1e6:.1f} | {len(rows)} | " + " | ".join(cells) +
                     f" | {np.mean([r['time/total'] for r in rows]):.0f} |")
    return "\n".join(lines)


def report_columns(task: str) -> tuple[str, ...]:
    """The report's columns for `task`: the task's §6 columns, then the attacks' and side effects'."""
    return tuple(task_class(task).columns) + ATTACK_COLUMNS


def _present(rows: list[dict], names) -> list[str]:
    return [c for c in names if any(isinstance(r.get(c), (int, float)) for r in rows)]


def bar_plot(by_loc: dict, columns, path: Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per localization (mean over seeds, 95% error bars)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    locs = _order(by_loc)
    fig = Figure(figsize=(max(8, 1.2 * len(columns)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(locs)
    for i, loc in enumerate(locs):
        stats = [mean_interval([r.get(c) for r in by_loc[loc]]) for c in columns]
        means = [m for m, _ in stats]
        errors = [0 if math.isnan(h) else h for _, h in stats]
        ax.bar(np.arange(len(columns)) + i * width, means, width, yerr=errors, label=loc)
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("probability / accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def spider_plot(by_loc: dict, columns, path: Path, title: str) -> Path:
    """One polygon per localization over the metrics (means over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    angles = np.linspace(0, 2 * np.pi, len(columns), endpoint=False)
    fig = Figure(figsize=(7, 7))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="polar")
    for loc in _order(by_loc):
        values = [mean_interval([r.get(c) for r in by_loc[loc]])[0] for c in columns]
        values = np.nan_to_num(np.asarray(values))
        ax.plot(np.append(angles, angles[0]), np.append(values, values[0]), label=loc, linewidth=1.2)
    ax.set_xticks(angles, columns, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.0, 0.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def save_score_plots(directory: Path, scores: dict, cfg) -> list[Path]:
    """Heatmaps of the localization scores: AP / CT per head (layer × head) and per MLP layer."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for method in ("ap_scores", "ct_scores"):
        for site, values in (scores.get(method) or {}).items():
            values = np.asarray(values, np.float32)
            if values.ndim == 2 or (values.ndim == 1 and values.shape[0] == cfg.n_layers):
                axes = ("layer", "head") if values.ndim == 2 else ("layer",)
                score = ScoreArray(values, axes, f"{method.split('_')[0]}/{site}")
                paths.append(save_heatmap(score, directory / f"{method.split('_')[0]}_{site}.png"))
    return paths


def selection(rows: list[dict], grid_keys: list[str]) -> str:
    """§4.4: per (model, localization), the grid point with the highest mean selection score."""
    if not grid_keys:
        return ""
    best = {}
    for (model, point), by_loc in _groups(rows, grid_keys).items():
        for loc, group in by_loc.items():
            score = mean_interval([r["selection_score"] for r in group])[0]
            if (model, loc) not in best or score > best[model, loc][0]:
                best[model, loc] = (score, point)
    lines = ["| model | localization | best grid point | selection score |", "|---|---|---|---|"]
    for (model, loc), (score, point) in sorted(best.items()):
        lines.append(f"| {model} | {loc} | {', '.join(f'{k}={v}' for k, v in point)} | {score:.3f} |")
    return "\n".join(lines)


def write_report(store, config) -> Path:
    """report/summary.md (+ PNGs and tables) for every finished unit of the run."""
    rows = store.rows()
    directory = store.root / "report"
    directory.mkdir(parents=True, exist_ok=True)
    grid_keys = sorted(config.grid or {})
    parts = [f"# Sweep `{config.name}`: {config.task}", "",
             f"{len(rows)} units; models {', '.join(config.models)}; seeds {list(config.seeds)}; "
             f"{config.train.steps} edit steps × {config.train.accumulate} micro-batches of {config.train.batch_size}."
             " Probabilities are the paper's continuous accuracies (§5.1); ± is the 95% t-interval over seeds.", ""]
    for n, ((model, point), by_loc) in enumerate(sorted(_groups(rows, grid_keys).items(), key=str)):
        all_rows = [r for group in by_loc.values() for r in group]
        present = _present(all_rows, report_columns(config.task))
        label = ", ".join(f"{k}={v}" for k, v in point)
        title = f"{model}" + (f" ({label})" if label else "")
        first = all_rows[0]
        parts += [f"## {title}", "",
                  f"forget {first['n_forget']} facts (measured on {first['n_forget_test']}), maintain "
                  f"{first['n_maintain_train']} train / {first['n_maintain_test']} test; "
                  f"{first['n_known']} of {first['n_candidates']} candidate facts known.", "",
                  summary_table(by_loc, present), ""]
        prob_columns = [c for c in present if c not in ("selection_score", "after/general/kl")]
        bars = bar_plot(by_loc, prob_columns, directory / f"bars_{n}.png", title)
        spider = spider_plot(by_loc, prob_columns, directory / f"spider_{n}.png", title)
        parts += [f"![bars]({bars.name}) ![spider]({spider.name})", ""]
        before = {k.removeprefix("before/"): v for k, v in first.items() if k.startswith("before/")
                  and not k.endswith("_argmax") and isinstance(v, (int, float))}
        parts += ["Before editing: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(before.items())), ""]
    chosen = selection(rows, grid_keys)
    if chosen:
        parts += ["## Hyper-parameter selection (§4.4)", "", chosen, ""]
    heatmaps = sorted((directory / "scores").glob("*/*.png"))
    if heatmaps:
        parts += ["## Localization scores", ""] + [f"![{p.stem}]({p.relative_to(directory)})" for p in heatmaps] + [""]
    parts += ["Rows: `../results.jsonl` (one JSON object per unit, every metric)."]
    path = directory / "summary.md"
    atomic_write(path, "\n".join(parts) + "\n")
    return path
