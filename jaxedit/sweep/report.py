"""The report of a sweep: §6-style tables aggregated over seeds, plots, and a Markdown page.

`report/summary.md` links everything: one table per (model, grid point) in the paper's §6 shape (a
before-edit row, then a row per localization; the task's §6 columns in the paper's order, mean over
seeds, ± the 95% t-interval half-width when there are several seeds; columns whose before-edit value
is at chance marked †), the figures of `plots` (bars with 95% whiskers and the §6 spider plot, both
without the † columns; relearning curves; probe accuracy by layer), a paired comparison of fact lookup
against every other localization on the same seeds (`stats`), the §4.4 selection (best grid point per
localization), timings, and heatmaps of the localization scores."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxedit.localize.artifacts import ScoreArray, save_heatmap
from jaxedit.localize.components import PAPER_LOCALIZATIONS
from jaxedit.io import atomic_write
from jaxedit.sweep import plots, stats
from jaxedit.sweep.plots import BEFORE
from jaxedit.sweep.stats import mean_interval
from jaxedit.tasks import task_class

PAPER_TAIL = {  # after the task's own columns, in §6's order: tinyMMLU's slot, relearning, soft prompt, probe
    "sports": ("after/mmlu", "after/general/accuracy", "relearn_forget", "relearn_maintain", "softprompt_forget",
               "softprompt_maintain", "probe_gt_last"),
    "counterfact": ("after/mmlu", "after/general/accuracy", "relearn_forget", "relearn_edit", "relearn_maintain",
                    "softprompt_forget", "softprompt_maintain")}
EXTRA_COLUMNS = ("after/general/kl", "selection_score")  # not in the paper's tables (last), not probabilities
HEADLINE = ("forget", "edit", "maintain", "mcq_forget", "relearn_forget")
REFERENCE = "manual_interp"  # fact lookup: compared with every other localization, seed by seed
PAIRED = {"forget_qa": ("QA-format forget", True), "relearn_forget": ("relearned forget", True),  # column: (label,
          "probe_gt_last": ("probe ground truth", True), "maintain": ("maintain", False)}  # lower is better)
_SPORTS_CHANCE = {"fact": 1 / 3, "qa": 1 / 3, "mcq": 1 / 3}  # 4 candidates, but every athlete plays a team sport
CHANCE = {"sports_athletes": _SPORTS_CHANCE, "sport_to_golf": _SPORTS_CHANCE,  # task: {format: chance level}
          "counterfact": {"mcq": 0.25}, "counterfact_sequential": {"mcq": 0.25}}
CHANCE_RULE = ("Columns marked † are not informative on this model: before editing, the column's prompt format "
               "gives the true answer (of the forget facts; of the maintain facts for maintain columns) a mean "
               "probability over seeds at most "
               f"max({stats.CHANCE_MARGIN}, its 95% half-width) above chance. Chance: sports 1/3 (4 candidates, but "
               "every athlete plays one of the 3 team sports, and knowing only that gives 1/3; a uniform guess gives "
               "1/4); CounterFact MCQ 1/4; CounterFact's full-vocabulary formats have no chance level and are never "
               "marked.")


def headline(row: dict) -> list[str]:
    return [k for k in HEADLINE if isinstance(row.get(k), (int, float))]


def _cell(values) -> str:
    mean, half = mean_interval(values)
    if np.isnan(mean):
        return "–"
    return f"{mean:.3f}" if np.isnan(half) else f"{mean:.3f} ± {half:.3f}"


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


def _before_cells(rows: list[dict], columns, before: dict) -> list[str]:
    """Cells of the before-edit row: the before-edit value over seeds of each column that has one."""
    return [_cell(_by_seed(rows, before[c]).values()) if c in before else "–" for c in columns]


def summary_table(by_loc: dict, columns, marked=(), before=None) -> str:
    """The §6 table: a before-edit row (`before`: {column: before-edit key}, see `before_keys`), then one row per
    localization; cells are means ± 95% half-widths over seeds; `marked` columns get †."""
    names = [c + "†" * (c in marked) for c in columns]
    head = "| localization | params (M) | seeds | " + " | ".join(names) + " | time (s) |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    all_rows = [r for rows in by_loc.values() for r in rows]
    if before:
        lines.append(f"| {BEFORE} | – | {len(_by_seed(all_rows, 'seed'))} | " +
                     " | ".join(_before_cells(all_rows, columns, before)) + " | – |")
    for loc in _order(by_loc):
        rows = by_loc[loc]
        cells = [_cell([r.get(c) for r in rows]) for c in columns]
        lines.append(f"| {loc} | {rows[0]['n_params'] / 1e6:.1f} | {len(rows)} | " + " | ".join(cells) +
                     f" | {np.mean([r['time/total'] for r in rows]):.0f} |")
    return "\n".join(lines)


def report_columns(task: str) -> tuple[str, ...]:
    """The report's columns for `task` in the paper's §6 order (6.1 sports, 6.5 CounterFact), then the extras."""
    family = "counterfact" if task.startswith("counterfact") else "sports"
    return tuple(task_class(task).columns) + PAPER_TAIL[family] + EXTRA_COLUMNS


def before_keys(task: str, rows: list[dict], columns) -> dict[str, str]:
    """{column: its before-edit key} for the columns whose metric rows also measured before editing."""
    keys = dict(task_class(task).columns)
    out = {c: "before/" + keys.get(c, c).removeprefix("after/") for c in columns}
    return {c: k for c, k in out.items() if any(isinstance(r.get(k), (int, float)) for r in rows)}


def with_derived(row: dict) -> dict:
    """The row with `relearn_edit`: P(injected) on the held-out forget facts after the last relearning step."""
    steps = [int(k.split("/")[1]) for k in row if k.startswith("relearn/") and k.endswith("/fact/edit")]
    return row | {"relearn_edit": row[f"relearn/{max(steps)}/fact/edit"]} if steps else row


def _present(rows: list[dict], names) -> list[str]:
    return [c for c in names if any(isinstance(r.get(c), (int, float)) for r in rows)]


def _by_seed(rows: list[dict], key: str) -> dict:
    """{seed: row[key]} (before-edit values repeat in every localization's row of a seed)."""
    return {r["seed"]: r.get(key) for r in rows}


def chance_reference(task: str, column: str) -> tuple[str, float] | None:
    """(before-edit key, chance level) deciding whether `column` is informative; None where chance is undefined."""
    key = task_class(task).columns.get(column)
    if key is None:
        return None
    _, fmt, metric = key.split("/")
    chance = CHANCE.get(task, {}).get(fmt)
    if chance is None:
        return None
    return f"before/{fmt}/{'maintain' if metric.startswith('maintain') else 'forget'}", chance


def not_informative(rows: list[dict], columns, task: str) -> dict[str, str]:
    """{column: why} for the columns whose before-edit value over seeds is at chance (`CHANCE_RULE`)."""
    out = {}
    for column in columns:
        reference = chance_reference(task, column)
        if reference is None:
            continue
        key, chance = reference
        before = _by_seed(rows, key).values()
        if stats.at_chance(before, chance):
            out[column] = f"{column} ({key} {_cell(before)}, chance {chance:.3f})"
    return out


def _paired_cell(p: stats.Paired) -> str:
    if p.n == 0:
        return "–"
    return f"{p.diff:+.3f} (1 seed)" if p.n == 1 else f"{p.diff:+.3f} ({p.low:+.3f} to {p.high:+.3f})"


def paired_comparison(by_loc: dict, marked=()) -> str:
    """`REFERENCE` − each other localization on the same seeds: differences [95% CI], one verdict line per metric."""
    rows = [r for group in by_loc.values() for r in group]
    metrics = _present(rows, PAIRED)
    others = [loc for loc in _order(by_loc) if loc != REFERENCE]
    if REFERENCE not in by_loc or not others or not metrics:
        return ""
    result = {(c, o): stats.paired(_by_seed(by_loc[REFERENCE], c), _by_seed(by_loc[o], c))
              for c in metrics for o in others}
    seeds = set(_by_seed(by_loc[REFERENCE], "seed"))
    lines = ["| against | seeds | " + " | ".join(PAIRED[c][0] for c in metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    for o in others:
        lines.append(f"| {o} | {len(seeds & set(_by_seed(by_loc[o], 'seed')))} | " +
                     " | ".join(_paired_cell(result[c, o]) for c in metrics) + " |")
    lines += ["", f"Cells: mean of {REFERENCE} − the other localization over paired seeds (95% paired-t interval)."]
    for c in metrics:
        label, lower = PAIRED[c]
        caveat = "; not informative on this model, see †" if c in marked else ""
        clauses = [stats.verdict(label, REFERENCE, o, result[c, o], lower) for o in others]
        lines.append(f"- {label} ({'lower' if lower else 'higher'} is better{caveat}): " + "; ".join(clauses) + ".")
    return "\n".join(lines)


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


def figures(by_loc: dict, columns, marked, directory: Path, n: int, title: str) -> str:
    """Draws group n's figures (`plots`) into directory; their Markdown image links."""
    by_loc = {loc: by_loc[loc] for loc in _order(by_loc)}
    bars = [c for c in columns if c not in EXTRA_COLUMNS]
    drawn = {"bars": plots.bar_plot(by_loc, bars, directory / f"bars_{n}.png", title, marked),
             "spider": plots.spider_plot(by_loc, directory / f"spider_{n}.png", title, marked),
             "relearn": plots.relearn_plot(by_loc, directory / f"relearn_{n}.png", title),
             "probe": plots.probe_plot(by_loc, directory / f"probe_{n}.png", title)}
    return " ".join(f"![{name}]({name}_{n}.png)" for name, fig in drawn.items() if fig is not None)


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
    rows = [with_derived(r) for r in store.rows()]
    directory = store.root / "report"
    directory.mkdir(parents=True, exist_ok=True)
    grid_keys = sorted(config.grid or {})
    parts = [f"# Sweep `{config.name}`: {config.task}", "",
             f"{len(rows)} units; models {', '.join(config.models)}; seeds {list(config.seeds)}; "
             f"{config.train.steps} edit steps × {config.train.accumulate} micro-batches of {config.train.batch_size}."
             " Probabilities are the paper's continuous accuracies (§5.1); ± is the half-width of the 95% Student-t"
             " interval over seeds (exact quantile, n − 1 degrees of freedom); a cell from one seed shows its mean"
             " only, as one seed gives no interval.", "", CHANCE_RULE, ""]
    for n, ((model, point), by_loc) in enumerate(sorted(_groups(rows, grid_keys).items(), key=str)):
        all_rows = [r for group in by_loc.values() for r in group]
        present = _present(all_rows, report_columns(config.task))
        label = ", ".join(f"{k}={v}" for k, v in point)
        title = f"{model}" + (f" ({label})" if label else "")
        first = all_rows[0]
        marked = not_informative(all_rows, present, config.task)
        parts += [f"## {title}", "",
                  f"forget {first['n_forget']} facts (measured on {first['n_forget_test']}), maintain "
                  f"{first['n_maintain_train']} train / {first['n_maintain_test']} test; "
                  f"{first['n_known']} of {first['n_candidates']} candidate facts known.", "",
                  summary_table(by_loc, present, marked, before_keys(config.task, all_rows, present)), ""]
        if marked:
            parts += ["† not informative on this model (before-edit value at chance): " + "; ".join(marked.values()),
                      ""]
        parts += [figures(by_loc, present, marked, directory, n, title), ""]
        before = sorted(k for k in first if k.startswith("before/") and not k.endswith("_argmax")
                        and isinstance(first[k], (int, float)))
        cells = [f"{k.removeprefix('before/')} {_cell(_by_seed(all_rows, k).values())}" for k in before]
        parts += ["Before editing (over seeds): " + ", ".join(cells), ""]
        comparison = paired_comparison(by_loc, marked)
        if comparison:
            parts += [f"### Paired comparison: {REFERENCE} against every other localization, same seeds", "",
                      comparison, ""]
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
