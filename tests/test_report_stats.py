"""The report's statistics: exact t-intervals, paired comparisons, verdicts, chance marking, the summary section."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxedit.sweep import report, stats
from jaxedit.sweep.config import SweepConfig
from jaxedit.sweep.store import RunStore


def _hand_interval(values):
    """mean ± t(0.975, n − 1) · s / √n, by hand."""
    values = np.asarray(values, np.float64)
    n = values.size
    half = scipy_stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return values.mean(), half


@pytest.mark.parametrize("n", range(2, 31))
def test_interval_matches_scipy_t_for_2_to_30_seeds(n):
    values = np.random.default_rng(n).normal(0.5, 0.1, n)
    mean, half = stats.mean_interval(values.tolist())
    want_mean, want_half = _hand_interval(values)
    assert mean == pytest.approx(want_mean, rel=1e-12)
    assert half == pytest.approx(want_half, rel=1e-9)


def test_one_seed_has_no_interval_and_missing_values_are_dropped():
    mean, half = stats.mean_interval([0.4])
    assert mean == 0.4 and math.isnan(half)
    mean, half = stats.mean_interval([0.2, None, float("nan"), 0.6])
    want_mean, want_half = _hand_interval([0.2, 0.6])
    assert (mean, half) == pytest.approx((want_mean, want_half))
    assert "±" not in report._cell([0.4]) and report._cell([0.4]) == "0.400"


def test_paired_comparison_on_hand_made_numbers():
    a = {0: 0.10, 1: 0.30, 2: 0.20, 3: 0.50, 5: float("nan")}
    b = {3: 0.62, 2: 0.41, 1: 0.55, 0: 0.37, 4: 0.90, 5: 0.3}  # another order; seeds 4 and 5 are not paired
    d = np.array([0.10 - 0.37, 0.30 - 0.55, 0.20 - 0.41, 0.50 - 0.62])
    half = scipy_stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2.0
    p = stats.paired(a, b)
    assert p.n == 4
    assert (p.diff, p.low, p.high) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    assert stats.paired({0: 0.2}, {0: 0.5}).n == 1 and math.isnan(stats.paired({0: 0.2}, {0: 0.5}).low)


def test_verdict_wording():
    clear = stats.Paired(-0.12, -0.20, -0.04, 3)
    text = stats.verdict("relearned forget", "manual_interp", "localized_ap", clear, lower_is_better=True)
    assert text == ("manual_interp has lower relearned forget than localized_ap, better "
                    "(-0.120, 95% CI -0.200 to -0.040, 3 seeds)")
    worse = stats.verdict("maintain", "manual_interp", "random", clear, lower_is_better=False)
    assert worse.startswith("manual_interp has lower maintain than random, worse")
    undirected = stats.verdict("x", "manual_interp", "random", stats.Paired(0.3, 0.1, 0.5, 4))
    assert undirected.startswith("manual_interp has higher x than random (") and "better" not in undirected
    unclear = stats.verdict("relearned forget", "manual_interp", "random", stats.Paired(0.05, -0.1, 0.2, 3), True)
    assert unclear == "no difference from random supported by 3 seeds (+0.050, 95% CI -0.100 to +0.200)"
    one_seed = stats.verdict("maintain", "manual_interp", "random", stats.Paired(0.1, math.nan, math.nan, 1))
    assert "no verdict" in one_seed


def test_at_chance_uses_the_interval_or_the_margin():
    assert stats.at_chance([0.36, 0.37], 1 / 3)  # within the 0.05 margin
    assert not stats.at_chance([0.50, 0.52, 0.51], 1 / 3)
    assert stats.at_chance([0.20, 0.24, 0.22], 1 / 3)  # below chance: no knowledge either
    assert stats.at_chance([0.30, 0.70], 1 / 3)  # 0.5 is above chance by 0.17, inside its wide interval
    assert not stats.at_chance([], 0.25)


def _row(seed: int, loc: str, shift: float = 0.0) -> dict:
    """A unit's row as the sweep writes it (sports task), every metric made up."""
    return {"model": "tiny", "seed": seed, "localization": loc, "n_params": 1e6, "time/total": 1.0,
            "n_forget": 4, "n_forget_test": 4, "n_maintain_train": 8, "n_maintain_test": 2, "n_known": 14,
            "n_candidates": 20, "selection_score": 2.0, "forget": 0.1, "edit": 0.8, "maintain": 0.8 + shift,
            "forget_qa": 0.2 + shift, "mcq_forget": 0.25, "relearn_forget": 0.3 + shift + 0.01 * seed,
            "probe_gt_last": 0.5 + 0.02 * seed * (loc == "random"),
            "before/fact/forget": 0.8 + 0.01 * seed, "before/fact/maintain": 0.75, "before/qa/forget": 0.85,
            "before/qa/maintain": 0.8, "before/mcq/forget": 0.22 + 0.01 * seed, "before/mcq/maintain": 0.24}


def test_mcq_columns_at_chance_are_marked_not_informative():
    rows = [_row(s, loc) for s in range(3) for loc in ("manual_interp", "random")]
    columns = ["forget", "maintain", "edit", "forget_qa", "mcq_forget", "mcq_edit", "mcq_maintain", "relearn_forget"]
    marked = report.not_informative(rows, columns, "sports_athletes")
    assert sorted(marked) == ["mcq_edit", "mcq_forget", "mcq_maintain"]
    rows = [r | {"before/mcq/forget": 0.9, "before/mcq/maintain": 0.9} for r in rows]
    assert report.not_informative(rows, columns, "sports_athletes") == {}


def test_report_has_the_paired_comparison(tmp_path):
    store = RunStore(tmp_path / "run")
    shifts = {"manual_interp": -0.2, "localized_ap": 0.0, "random": 0.0}
    for seed in range(3):
        for loc, shift in shifts.items():
            store.write_unit(f"tiny__s{seed}__{loc}", _row(seed, loc, shift))
    config = SweepConfig(name="fake", models=("tiny",), seeds=(0, 1, 2), localizations=tuple(shifts))
    summary = report.write_report(store, config).read_text()
    assert "### Paired comparison" in summary
    assert "| localized_ap | 3 | -0.200 (-0.200 to -0.200) |" in summary
    assert "manual_interp has lower relearned forget than localized_ap, better" in summary
    assert "manual_interp has lower maintain than random, worse" in summary
    assert "- probe ground truth (lower is better): no difference from localized_ap supported by 3 seeds" in summary
    assert "| mcq_forget† |" in summary and report.CHANCE_RULE in summary


def test_grid_selection_picks_the_best_mean_score_per_model_and_localization(tmp_path):
    """§4.4 on hand-made rows: per (model, localization), the grid point whose mean selection score over seeds is
    highest; each grid point gets its own table, its cells the mean ± t-interval of that point's seeds only."""
    scores = {  # (model, localization, train.lr): selection score per seed; the best means picked by hand below
        ("m1", "manual_interp", 0.1): [2.0, 2.2], ("m1", "manual_interp", 0.3): [2.5, 1.9],  # 2.1 vs 2.2
        ("m1", "random", 0.1): [1.0, 3.0], ("m1", "random", 0.3): [1.9, 2.0],  # 2.0 vs 1.95
        ("m2", "manual_interp", 0.1): [0.5, 0.7], ("m2", "manual_interp", 0.3): [0.2, 0.3]}
    store = RunStore(tmp_path / "run")
    for (model, loc, lr), values in scores.items():
        for seed, value in enumerate(values):
            row = _row(seed, loc) | {"model": model, "train.lr": lr, "selection_score": value,
                                     "forget": 0.1 * seed + lr}
            store.write_unit(f"{model}__s{seed}__lr{lr}__{loc}", row)
    rows = store.rows()
    table = report.selection(rows, ["train.lr"]).splitlines()
    assert table[2:] == ["| m1 | manual_interp | train.lr=0.3 | 2.200 |", "| m1 | random | train.lr=0.1 | 2.000 |",
                         "| m2 | manual_interp | train.lr=0.1 | 0.600 |"]
    assert report.selection(rows, []) == ""
    config = SweepConfig(name="grid", models=("m1", "m2"), seeds=(0, 1), localizations=("manual_interp", "random"),
                         grid={"train.lr": [0.1, 0.3]})
    summary = report.write_report(store, config).read_text()
    assert "## Hyper-parameter selection (§4.4)" in summary and "| m1 | random | train.lr=0.1 | 2.000 |" in summary
    for model, lr in (("m1", 0.1), ("m1", 0.3), ("m2", 0.3)):
        section = summary.split(f"## {model} (train.lr={lr})")[1].split("\n## ")[0]
        forget = [0.0 + lr, 0.1 + lr]  # the two seeds of this point only
        mean, half = _hand_interval(forget)
        assert f"| manual_interp | 1.0 | 2 | {mean:.3f} ± {half:.3f} |" in section
