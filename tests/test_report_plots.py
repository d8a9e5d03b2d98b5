"""The report in the paper's §6 shape: table row and column order, spider axes, relearning curves, probes, † columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxedit.sweep import plots, report
from jaxedit.sweep.config import SweepConfig
from jaxedit.sweep.store import RunStore

LOCS = ("random", "manual_interp", "localized_ap")  # deliberately not in the paper's order
SEEDS = (0, 1, 2)
STEPS = (0, 10, 20)
N_LAYERS = 4
SPORTS_ORDER = ["forget", "maintain", "edit", "forget_qa", "mcq_forget", "mcq_edit", "mcq_maintain",  # §6.1
                "after/general/accuracy", "relearn_forget", "relearn_maintain", "softprompt_forget",
                "softprompt_maintain", "probe_gt_last", "after/general/kl", "selection_score"]
COUNTERFACT_ORDER = ["forget", "edit", "maintain", "mcq_forget", "mcq_edit", "mcq_maintain", "paraphrase",  # §6.5
                     "paraphrase_edit", "neighborhood", "neighborhood_edit", "after/mmlu", "after/general/accuracy",
                     "relearn_forget", "relearn_edit", "relearn_maintain", "softprompt_forget", "softprompt_maintain",
                     "after/general/kl", "selection_score"]


def _row(seed: int, loc: str) -> dict:
    """A sports unit's row with made-up metrics that differ by seed and localization."""
    k, s = LOCS.index(loc), seed
    relearn = {f"relearn/{t}/fact/{m}": round(0.01 * t * (k + 1) + 0.03 * s + (0.3 if m == "maintain" else 0), 4)
               for t in STEPS for m in ("forget", "maintain")}
    return {"model": "tiny", "seed": seed, "localization": loc, "n_params": 2e6, "time/total": 3.0,
            "n_forget": 4, "n_forget_test": 4, "n_maintain_train": 8, "n_maintain_test": 4, "n_known": 16,
            "n_candidates": 20, "selection_score": 2.5 - 0.1 * k,
            "forget": 0.05 * k + 0.01 * s, "maintain": 0.9 - 0.1 * k + 0.02 * s * s, "edit": 0.8 - 0.2 * k + 0.01 * s,
            "forget_qa": 0.1 + 0.05 * k, "mcq_forget": 0.2 + 0.1 * k + 0.01 * s, "mcq_edit": 0.7 - 0.2 * k - 0.03 * s,
            "mcq_maintain": 0.85 - 0.01 * s, "after/general/accuracy": 0.40 - 0.01 * k + 0.005 * s,
            "after/general/kl": 0.02 * k, "relearn_forget": relearn["relearn/20/fact/forget"],
            "relearn_maintain": relearn["relearn/20/fact/maintain"], "softprompt_forget": 0.3 + 0.01 * s,
            "softprompt_maintain": 0.4, "probe_gt_last": 0.1 * k,
            "probe_ground_truth": [0.5 + 0.01 * s, 0.9 - 0.3 * k + 0.02 * s, 0.7 - 0.2 * k, 0.1 * k * s][:N_LAYERS],
            "before/fact/forget": 0.7 + 0.01 * s, "before/fact/maintain": 0.75 + 0.02 * s,
            "before/qa/edit": 0.1 + 0.01 * s, "before/qa/forget": 0.8, "before/mcq/forget": 0.85 + 0.01 * s,
            "before/mcq/edit": 0.05, "before/mcq/maintain": 0.9 - 0.01 * s, "before/general/accuracy": 0.41 + 0.001 * s,
            "before/probe_gt_last": 0.9 - 0.05 * s, "before/probe_ground_truth": [0.6, 0.8 + 0.03 * s, 0.9, 0.9 - 0.05 * s],
            **relearn}


def _rows(**changes) -> list[dict]:
    return [_row(s, loc) | changes for s in SEEDS for loc in LOCS]


def _by_loc(rows) -> dict:
    return {loc: [r for r in rows if r["localization"] == loc] for loc in report.PAPER_LOCALIZATIONS
            if any(r["localization"] == loc for r in rows)}


def _mean(values) -> float:
    return float(np.mean(values))


def _half(values) -> float:
    values = np.asarray(values, np.float64)
    return scipy_stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)


def _summary(tmp_path, rows, task="sports_athletes") -> str:
    store = RunStore(tmp_path / "run")
    for r in rows:
        store.write_unit(f"tiny__s{r['seed']}__{r['localization']}", r)
    config = SweepConfig(name="fake", task=task, models=("tiny",), seeds=SEEDS, localizations=LOCS)
    return report.write_report(store, config).read_text()


def _table(summary: str) -> list[list[str]]:
    """The first summary table's cells, header first (separator line dropped)."""
    lines = summary.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| localization |")))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return [table[0]] + table[2:]


def _line(ax, label: str):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_summary_table_before_edit_row_first_then_paper_order(tmp_path):
    summary = _summary(tmp_path, _rows())
    header, *body = _table(summary)
    assert header == ["localization", "params (M)", "seeds"] + SPORTS_ORDER + ["time (s)"]
    assert [r[0] for r in body] == ["before edit", "manual_interp", "localized_ap", "random"]
    before = dict(zip(header, body[0]))
    values = [0.7 + 0.01 * s for s in SEEDS]
    assert before["forget"] == f"{_mean(values):.3f} ± {_half(values):.3f}"
    values = [0.41 + 0.001 * s for s in SEEDS]
    assert before["after/general/accuracy"] == f"{_mean(values):.3f} ± {_half(values):.3f}"
    assert before["seeds"] == "3" and before["relearn_forget"] == "–"
    values = [0.9 - 0.05 * s for s in SEEDS]
    assert before["probe_gt_last"] == f"{_mean(values):.3f} ± {_half(values):.3f}"
    random = dict(zip(header, body[3]))
    values = [_row(s, "random")["edit"] for s in SEEDS]
    assert random["edit"] == f"{_mean(values):.3f} ± {_half(values):.3f}"
    for name in ("bars_0.png", "spider_0.png", "relearn_0.png", "probe_0.png"):
        assert f"({name})" in summary and (tmp_path / "run" / "report" / name).stat().st_size > 0


def test_report_columns_follow_the_paper():
    assert list(report.report_columns("counterfact")) == COUNTERFACT_ORDER
    assert list(report.report_columns("sports_athletes")) == (SPORTS_ORDER[:7] + ["after/mmlu"] + SPORTS_ORDER[7:])
    row = report.with_derived({"relearn/0/fact/edit": 0.1, "relearn/20/fact/edit": 0.4, "relearn/10/fact/edit": 0.3})
    assert row["relearn_edit"] == 0.4


@pytest.mark.parametrize("mmlu", [False, True])
def test_spider_axes_equal_hand_means(tmp_path, mmlu):
    rows = _rows()
    if mmlu:
        rows = [r | {"after/mmlu": 0.6 + 0.01 * r["seed"] - 0.02 * LOCS.index(r["localization"])} for r in rows]
    fig = plots.spider_plot(_by_loc(rows), tmp_path / "spider.png", "tiny")
    ax = fig.axes[0]
    general = "general capability (MMLU)" if mmlu else "general capability (general-text accuracy)"
    assert [t.get_text() for t in ax.get_xticklabels()] == [general, "edit", "maintain", "MCQ edit",
                                                            "1 − relearned forget"]
    for loc in LOCS:
        own = [r for r in rows if r["localization"] == loc]
        want = [_mean([r["after/mmlu" if mmlu else "after/general/accuracy"] for r in own]),
                _mean([r["edit"] for r in own]), _mean([r["maintain"] for r in own]),
                _mean([r["mcq_edit"] for r in own]), _mean([1 - r["relearn/20/fact/forget"] for r in own])]
        drawn = _line(ax, loc).get_ydata()
        assert drawn[:-1] == pytest.approx(want) and drawn[-1] == pytest.approx(want[0])  # closed polygon


def test_relearning_curves_equal_hand_means_per_step(tmp_path):
    rows = _rows()
    fig = plots.relearn_plot(_by_loc(rows), tmp_path / "relearn.png", "tiny")
    forget_ax, maintain_ax = fig.axes
    assert forget_ax.get_xlabel() == "relearning step"
    for loc in LOCS:
        own = [r for r in rows if r["localization"] == loc]
        for ax, metric in ((forget_ax, "forget"), (maintain_ax, "maintain")):
            line = _line(ax, loc)
            want = [_mean([r[f"relearn/{t}/fact/{metric}"] for r in own]) for t in STEPS]
            assert list(line.get_xdata()) == list(STEPS)
            assert line.get_ydata() == pytest.approx(want)
    own = [r["relearn/20/fact/forget"] for r in rows if r["localization"] == "random"]
    band = forget_ax.collections[list(_by_loc(rows)).index("random")]  # one band per line, in order
    top = band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(_mean(own) + _half(own))


def test_probe_lines_equal_hand_means_per_layer(tmp_path):
    rows = _rows()
    fig = plots.probe_plot(_by_loc(rows), tmp_path / "probe.png", "tiny")
    ax = fig.axes[0]
    for loc in LOCS:
        own = [r["probe_ground_truth"] for r in rows if r["localization"] == loc]
        line = _line(ax, loc)
        assert list(line.get_xdata()) == list(range(N_LAYERS))
        assert line.get_ydata() == pytest.approx(np.mean(own, axis=0))
    before = [[0.6, 0.8 + 0.03 * s, 0.9, 0.9 - 0.05 * s] for s in SEEDS]  # one per seed, not one per row
    assert _line(ax, "before edit").get_ydata() == pytest.approx(np.mean(before, axis=0))
    assert plots.probe_plot(_by_loc([{k: v for k, v in r.items() if k != "probe_ground_truth"} for r in rows]),
                            tmp_path / "none.png", "tiny") is None


def test_bars_are_hand_means_with_t_whiskers(tmp_path):
    rows = _rows()
    columns = ["forget", "edit", "relearn_forget"]
    fig = plots.bar_plot(_by_loc(rows), columns, tmp_path / "bars.png", "tiny")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == columns
    bars = {c.get_label(): c for c in ax.containers if hasattr(c, "errorbar")}
    assert sorted(bars) == sorted(LOCS)
    for loc in LOCS:
        own = [r for r in rows if r["localization"] == loc]
        heights = [p.get_height() for p in bars[loc].patches]
        assert heights == pytest.approx([_mean([r[c] for r in own]) for c in columns])
        segments = bars[loc].errorbar.lines[2][0].get_segments()
        assert [s[1, 1] - s[0, 1] for s in segments] == pytest.approx([2 * _half([r[c] for r in own])
                                                                      for c in columns])


def test_not_informative_columns_are_not_drawn(tmp_path):
    rows = _rows(**{"before/mcq/forget": 0.34})  # MCQ forget facts at chance (1/3) before editing
    marked = report.not_informative(rows, report.report_columns("sports_athletes"), "sports_athletes")
    assert sorted(marked) == ["mcq_edit", "mcq_forget"]
    columns = ["forget", "edit", "mcq_forget", "mcq_edit", "mcq_maintain"]
    ax = plots.bar_plot(_by_loc(rows), columns, tmp_path / "bars.png", "tiny", marked).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["forget", "edit", "mcq_maintain"]
    assert all(len(c.patches) == 3 for c in ax.containers if hasattr(c, "errorbar"))
    spider = plots.spider_plot(_by_loc(rows), tmp_path / "spider.png", "tiny", marked).axes[0]
    assert "MCQ edit" not in [t.get_text() for t in spider.get_xticklabels()]
    assert "mcq_edit†" in _table(_summary(tmp_path, rows))[0]  # still in the table, marked
