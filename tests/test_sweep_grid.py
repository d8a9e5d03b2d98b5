"""A sweep's grid reaches every unit: its row, the optimizers it builds, its results, its report.

The CLI runs on a tiny random Llama with SmolLM2's tokenizer in a subprocess whose learning-rate
schedules (the edit's and the relearning attack's) are spied on: the reference for "the unit
trained with lr x" is the value its optimizer was built with, not the row that claims it. The
sweeps share a persistent compilation cache (units differ in constants, not in programs).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxedit.errors import JaxeditError
from jaxedit.sweep import __main__ as sweep_cli
from jaxedit.sweep.config import load_config
from jaxedit.sweep.units import expand

GRID = {"train.lr": [1e-3, 3e-2], "relearn.lr": [1e-3, 1e-1], "eval.probes": [False, True],
        "data.max_maintain": [8, 10]}


def _config(model_dir, output, **changes) -> dict:
    config = {
        "name": "grid", "task": "sports_athletes", "models": [str(model_dir)], "localizations": ["manual_interp"],
        "seeds": [0], "data": {"n_forget": 4, "max_maintain": 10, "known_threshold": 0.0},
        "localize": {"flu_layers": [1]}, "train": {"steps": 2, "batch_size": 4, "accumulate": 1, "lr": 1e-3},
        "general_text": {"n": 0}, "eval": {"probe_steps": 5},
        "relearn": {"lora_rank": 2, "steps": 1, "eval_at": [1], "batch_size": 2, "accumulate": 1},
        "soft_prompt": {"enabled": False}, "output": str(output),
    }
    return config | changes


def _write(tmp_path, config: dict):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


ROOT = Path(__file__).resolve().parents[1]
SPIED_SWEEP = """
import json, sys
from jaxedit.attacks import relearn
from jaxedit.edit import train
from jaxedit.sweep.__main__ import main

calls = {"edit": [], "relearn": []}
for module, key in ((train, "edit"), (relearn, "relearn")):
    def schedule(lr, *args, _real=module.cosine_schedule, _key=key, **kwargs):
        calls[_key].append(lr)
        return _real(lr, *args, **kwargs)
    module.cosine_schedule = schedule
code = main(sys.argv[2:])
open(sys.argv[1], "w").write(json.dumps(calls))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Run the CLI on a config file: (exit code, the learning rates its optimizers were built with)."""
    xla = tmp_path_factory.mktemp("xla")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(xla),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAXEDIT_CACHE=str(tmp_path_factory.mktemp("cache")))
    env.pop("XLA_FLAGS", None)

    def run(path: str):
        calls = Path(path).with_suffix(".calls.json")
        done = subprocess.run([sys.executable, "-c", SPIED_SWEEP, str(calls), path], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(calls.read_text())

    return run


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_every_grid_point_runs_with_its_own_values(tiny_llama_dir, tmp_path, sweep):
    config = _config(tiny_llama_dir, tmp_path / "runs", grid=GRID)
    config["train"].pop("lr")
    calls = sweep(_write(tmp_path, config))
    edit_lrs, relearn_lrs = calls["edit"], calls["relearn"]
    rows = sorted(_rows(tmp_path / "runs" / "grid"), key=lambda r: r["unit"])
    assert len(rows) == 16 and len(edit_lrs) == 16 and len(relearn_lrs) == 16
    # units run in `expand` order: the i-th optimizer belongs to the i-th unit of that order
    order = {u.id: i for i, u in enumerate(expand(load_config(_write(tmp_path, config))))}
    assert sorted(order) == [r["unit"] for r in rows]
    for row in rows:
        i = order[row["unit"]]
        assert edit_lrs[i] == row["train.lr"] == row["lr"]  # the edit's optimizer got the point's lr
        assert relearn_lrs[i] == row["relearn.lr"]  # and the relearning attack's optimizer its own
        assert row["n_maintain_train"] == int(0.8 * row["data.max_maintain"])  # the data key reached the split
        assert ("probe_gt_last" in row) == row["eval.probes"]  # the evaluation key reached the evaluation

    def differs(key, metric):
        """Rows equal in every grid key but `key` have different `metric`."""
        others = [k for k in GRID if k != key]
        pairs = {}
        for row in rows:
            pairs.setdefault(tuple(row[k] for k in others), []).append(row[metric])
        return all(len(set(map(json.dumps, v))) == 2 for v in pairs.values())

    assert differs("train.lr", "after/fact/forget")
    assert differs("relearn.lr", "relearn_forget")
    assert differs("data.max_maintain", "after/fact/maintain")
    summary = (tmp_path / "runs" / "grid" / "report" / "summary.md").read_text()
    assert "Hyper-parameter selection" in summary and "train.lr=0.03" in summary


def test_a_list_valued_grid_key_reports(tiny_llama_dir, tmp_path, sweep):
    config = _config(tiny_llama_dir, tmp_path / "runs", grid={"localize.flu_layers": [[0], [1]]},
                     eval={"probes": False})
    config["relearn"] = {"enabled": False}
    sweep(_write(tmp_path, config))
    rows = _rows(tmp_path / "runs" / "grid")
    assert sorted(r["localize.flu_layers"] for r in rows) == [[0], [1]]
    assert rows[0]["components"] != rows[1]["components"]  # each point trained its own layer
    summary = (tmp_path / "runs" / "grid" / "report" / "summary.md").read_text()
    assert "localize.flu_layers=(0,)" in summary and "localize.flu_layers=(1,)" in summary


@pytest.mark.parametrize("grid, override, expect", [
    ({"train.lr": [1e-4]}, [], "train.preset sets"),
    (None, ["train.lr=1e-4"], "train.preset sets"),
    ({"train.forget_loss_coef": [1, 2]}, [], "train.preset sets"),
    ({"train.steps": [2, 0]}, [], "must be ≥ 1"),  # a bad grid value fails before anything runs
    ({"relearn.steps": [1, 0]}, [], "relearn.eval_at"),
    ({"mesh.data": [1, 2]}, [], "one per sweep"),
])
def test_bad_grids_fail_before_anything_runs(tiny_llama_dir, tmp_path, capsys, grid, override, expect):
    config = _config(tiny_llama_dir, tmp_path / "runs", grid=grid)
    config["train"].pop("lr")
    if expect.startswith("train.preset"):
        config["train"]["preset"] = "sports_athletes"
        config["train"]["preset_model"] = "gemma-7b"
    assert sweep_cli.main([_write(tmp_path, config), *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expect in err[-1], err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(JaxeditError):
        load_config(_write(tmp_path, config), override)


def test_a_preset_sets_lr_and_coefficient_per_localization(tiny_llama_dir, tmp_path, sweep):
    config = _config(tiny_llama_dir, tmp_path / "runs", localizations=["manual_interp", "random"])
    config["train"] = {"steps": 1, "batch_size": 4, "accumulate": 1, "preset": "sports_athletes",
                       "preset_model": "gemma-7b"}
    config["relearn"] = {"enabled": False}
    assert sweep(_write(tmp_path, config))["edit"] == [1e-5, 1e-5]
    rows = {r["localization"]: r for r in _rows(tmp_path / "runs" / "grid")}
    assert (rows["manual_interp"]["lr"], rows["manual_interp"]["forget_loss_coef"]) == (1e-5, 5)  # §4.4 table
    assert (rows["random"]["lr"], rows["random"]["forget_loss_coef"]) == (1e-5, 0.1)
