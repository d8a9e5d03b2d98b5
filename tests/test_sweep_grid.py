"""A sweep's grid reaches every unit: its row, the optimizers it builds, its results, its report.

The CLI runs on a tiny random Llama with SmolLM2's tokenizer in a subprocess whose train steps (the
edit's and the relearning attack's) are spied on: the reference for "the unit trained with lr x"
is the lr each micro-step's optimizer used, not the row that claims it. The spy also counts the
programs each unit builds: units differ in data, not in programs, so later units build none.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, sweep_env, tiny_sweep_config
from jaxedit.errors import JaxeditError
from jaxedit.sweep import __main__ as sweep_cli
from jaxedit.sweep.config import load_config
from jaxedit.sweep.units import expand

GRID = {"train.lr": [1e-3, 3e-2], "relearn.lr": [1e-3, 1e-1], "eval.probes": [False, True],
        "data.max_maintain": [8, 10]}


def _config(model_dir, output, **changes) -> dict:
    """The other sweep tests' config (their programs are in the shared compilation cache), one localization."""
    config = tiny_sweep_config(model_dir, output, name="grid", localizations=["manual_interp"]) | changes
    config["train"].pop("checkpoint_every")
    return config


def _write(tmp_path, config: dict):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


SPIED_SWEEP = """
import json, sys
from jaxedit.attacks import relearn
from jaxedit.compilation import CompileCounter
from jaxedit.edit import train
from jaxedit.sweep import runner
from jaxedit.sweep.__main__ import main

calls = {"edit": [], "relearn": [], "compiles": []}
for module, key in ((train, "edit"), (relearn, "relearn")):
    def step(*args, _real=module.train_step, _key=key):
        calls[_key].append(float(args[8]))  # the lr the optimizer of this micro-step uses
        return _real(*args)
    module.train_step = step

def run_unit(*args, _real=runner.run_unit):
    with CompileCounter() as counter:
        row = _real(*args)
    calls["compiles"].append(dict(counter.counts))
    return row
runner.run_unit = run_unit
code = main(sys.argv[2:])
open(sys.argv[1], "w").write(json.dumps(calls))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def sweep():
    """Run the CLI on a config file; returns {'edit', 'relearn': the lr of every micro-step of each in run order,
    'compiles': per unit, {function: programs built}}."""

    def run(path: str):
        calls = Path(path).with_suffix(".calls.json")
        done = subprocess.run([sys.executable, "-c", SPIED_SWEEP, str(calls), path], cwd=ROOT, env=sweep_env(),
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
    rows = sorted(_rows(tmp_path / "runs" / "grid"), key=lambda r: r["unit"])
    edit_micro, relearn_micro = 4 * 2, 2  # steps × accumulate of the edit and of the relearning attack
    assert len(rows) == 16 and len(calls["edit"]) == edit_micro * 16 and len(calls["relearn"]) == relearn_micro * 16
    edit_lrs, relearn_lrs = calls["edit"][::edit_micro], calls["relearn"][::relearn_micro]
    assert calls["edit"] == [lr for lr in edit_lrs for _ in range(edit_micro)]  # one lr per unit
    assert calls["relearn"] == [lr for lr in relearn_lrs for _ in range(relearn_micro)]
    # units run in `expand` order: the i-th optimizer belongs to the i-th unit of that order
    order = {u.id: i for i, u in enumerate(expand(load_config(_write(tmp_path, config))))}
    assert sorted(order) == [r["unit"] for r in rows]
    for row in rows:
        i = order[row["unit"]]
        assert edit_lrs[i] == row["train.lr"] == row["lr"]  # the edit's optimizer used the point's lr
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
    config["train"] |= {"preset": "sports_athletes", "preset_model": "gemma-7b"}
    config["train"].pop("lr")
    config["relearn"] = {"enabled": False}
    assert sweep(_write(tmp_path, config))["edit"] == [1e-5] * 2 * 8  # 2 units × 4 steps × 2 micro-batches
    rows = {r["localization"]: r for r in _rows(tmp_path / "runs" / "grid")}
    assert (rows["manual_interp"]["lr"], rows["manual_interp"]["forget_loss_coef"]) == (1e-5, 5)  # §4.4 table
    assert (rows["random"]["lr"], rows["random"]["forget_loss_coef"]) == (1e-5, 0.1)


def test_units_build_no_program_an_earlier_unit_built(tiny_llama_dir, tmp_path, sweep):
    """random_mlps trains another MLP layer than manual_interp before it: the same program, no new build at all;
    localized_ap (attention, another trainable structure) builds its own edit step and reuses every other program;
    the probes' program is the preparation's (before-edit probes), reused by every unit."""
    config = _config(tiny_llama_dir, tmp_path / "runs", localizations=["manual_interp", "random_mlps", "localized_ap"],
                     soft_prompt={"steps": 2, "batch_size": 2, "restarts": 2, "n_vectors": 2})
    first, same_groups, other_groups = sweep(_write(tmp_path, config))["compiles"]
    step = "jit(_train_step)"  # the edit's, the relearning attack's (LoRA) and the soft prompt's
    assert first[step] == 3 and first["jit(read_jit)"] >= 1
    assert "jit(_probe_predictions)" not in first  # the before-edit probes of the preparation built it
    assert same_groups == {}
    assert other_groups[step] == 1 and not {"jit(read_jit)", "jit(_probe_predictions)"} & set(other_groups)
    rows = {r["localization"]: r for r in _rows(tmp_path / "runs" / "grid")}
    assert rows["random_mlps"]["components"] != rows["manual_interp"]["components"]


def test_the_default_config_trains_each_group_with_the_measured_270m_preset():
    """configs/default.yaml: ≥ 3 seeds, and every unit's lr / coefficient is docs/budget_270m.md's choice for its group."""
    from jaxedit.sweep.runner import unit_settings

    config = load_config("default")
    assert len(config.seeds) >= 3 and config.train.preset == "sports_athletes"
    lr = {u.localization: unit_settings(config, u).train.lr for u in expand(config)}
    assert lr == {"manual_interp": 1e-4, "random_mlps": 1e-4, "localized_ap_mlps": 1e-4, "localized_ct_mlps": 1e-4,
                  "localized_ap": 3e-4, "localized_ct": 3e-4, "random": 3e-4, "nonlocalized": 3e-5, "all_mlps": 3e-5}
    assert {unit_settings(config, u).train.forget_loss_coef for u in expand(config)} == {1.0}
