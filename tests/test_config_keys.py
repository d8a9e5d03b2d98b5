"""Every config key is live: each key `python -m jaxedit.sweep --help` lists, set to a value other than its
default in a config file, reaches what it configures through the sweep's own parsing and units.

The sweeps run in this process on a tiny random model with spies on the library's entry points (the task's
`build` and `split`, `pipeline.localize`, `text.general_text`, `train`, the probes, MMLU, the two attacks,
the mesh, the model loader), which record the settings they are handed and then run; training itself is
skipped (the spy hands back the unedited params: training's own tests are tests/test_edit_training.py).
Keys that exclude each other (a preset and an explicit lr; a stage switched off and its settings; another
task; the mesh axes of one device) are set in separate sweeps, most of which stop at the entry point they
test. A key that `--help` lists and no sweep below sets fails the test, so a new key needs its check here.
"""

from __future__ import annotations

import csv
import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml

import jaxedit
from jaxedit import experiment, sharding
from jaxedit.data import sports, text
from jaxedit.eval import side_effects
from jaxedit.localize import pipeline
from jaxedit.sweep.__main__ import main
from jaxedit.sweep.config import load_config
from jaxedit.sweep import runner
from jaxedit.sweep.runner import run_sweep
from jaxedit.tasks import TASKS


class Stop(Exception):
    """Raised by a spy once the entry point a sweep tests has been reached."""


def _help_keys(capsys) -> dict[str, object]:
    """{key: default} as `python -m jaxedit.sweep --help` lists them (the lines under 'keys and their defaults')."""
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("keys and their defaults")) + 1
    keys = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        key, default = line.split(maxsplit=1)
        keys[key] = yaml.safe_load(default)
    return keys


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs some keys point at: a sports CSV, a CounterFact MCQ file, a text corpus, an MMLU directory."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copy(sports._BUILTIN, root / "sports.csv")
    (root / "mcq.json").write_text(json.dumps([{"prompt_id": "0", "question": "Which?", "target_true": "a",
                                                "targets_false": ["b", "c", "d"]}]))
    (root / "corpus.txt").write_text("The river ran past the old mill and into the valley below the town. " * 40)
    (root / "mmlu" / "test").mkdir(parents=True)
    with (root / "mmlu" / "test" / "anatomy_test.csv").open("w", newline="") as f:
        csv.writer(f).writerows([[f"Question {i}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(3)])
    return root


def _configs(model_dir, files: Path, output: Path) -> dict[str, dict]:
    """The sweeps: {name: config}, in order; the first sweep that sets a key checks it."""
    common = {"output": str(output), "models": [str(model_dir)], "localizations": ["random"], "seeds": [3],
              "data": {"path": str(files / "sports.csv"), "n_forget": 4, "known_threshold": 0.0, "max_maintain": 10,
                       "order": "seeded"},
              "localize": {"flu_layers": [1], "threshold": 0.05, "top_k_heads": 3, "ct_samples": 2,
                           "ct_noise": "paper", "rule": "threshold"},
              "train": {"steps": 2, "batch_size": 2, "accumulate": 2}}
    return {
        "off": common | {"name": "off", "grid": {"train.weight_decay": [0.25, 0.5]},  # runs to its report
                         "parallel_units": 2,
                         "train": common["train"] | {"preset": "sports_athletes", "preset_model": "gemma-2-9b"},
                         "general_text": {"n": 0}, "eval": {"probes": False}, "relearn": {"enabled": False},
                         "soft_prompt": {"enabled": False}},
        "relearn": common | {
            "name": "keys",
            "dtype": "bfloat16",
            "relearn": {"lora_rank": 3, "lora_alpha": 6.0, "lr": 0.003, "steps": 2, "eval_at": [1, 2], "batch_size": 2,
                        "accumulate": 1},
            "train": common["train"] | {"lr": 0.03, "forget_loss_coef": 2.0, "maintain_coef": 0.5, "lm_coef": 0.25,
                                        "kl_coef": 0.125, "unlearn": True, "clip_norm": 0.5, "weight_decay": 0.01,
                                        "warmup": 1, "remat": True, "lora_rank": 2,
                                        "lora_alpha": 4.0, "checkpoint_every": 1},
            "general_text": {"corpus": str(files / "corpus.txt"), "n": 4, "n_eval": 2, "ctx": 12,
                             "temperature": 0.5, "batch_size": 3},
            "eval": {"probe_steps": 3, "mmlu_dir": str(files / "mmlu"), "mmlu_limit": 2}},
        "soft_prompt": common | {"name": "soft", "relearn": {"enabled": False},
                                 "soft_prompt": {"kind": "prefix", "n_vectors": 2, "eps": 3.0, "lr": 0.001,
                                                 "grad_clip": 0.5, "steps": 1, "batch_size": 2, "restarts": 1}},
        "counterfact": {"name": "cf", "output": str(output), "models": [str(model_dir)], "task": "counterfact",
                        "data": {"mcq_path": str(files / "mcq.json"), "pool_size": 3, "split": "first_8_split"},
                        "eval": {"n_shots": 2}},
        **{f"mesh.{axis}": {"name": "mesh", "output": str(output), "models": [str(model_dir)],
                            "mesh": {axis: -1}} for axis in ("data", "fsdp", "tensor")},
    }


STOP_AT = {"relearn": "relearn", "soft_prompt": "soft_prompt", "counterfact": "split", "mesh.data": "mesh",
           "mesh.fsdp": "mesh", "mesh.tensor": "mesh"}  # where each sweep stops (None: it runs to its report)
SECTIONS = {"data": "split", "localize": "localize", "train": "train", "general_text": "general_text",
            "relearn": "relearn", "soft_prompt": "soft_prompt", "mesh": "mesh"}  # the entry point each section reaches


def _spy(monkeypatch, calls: dict, stop_at: str | None):
    """Wrap the library's entry points: record {entry: [settings-like values]}, raise Stop at `stop_at`."""

    def wrap(owner, attr, entry, pick, as_classmethod=False, instead=None):
        real = getattr(owner, attr)
        real = real.__func__ if as_classmethod else real

        def spy(*args, **kwargs):
            calls.setdefault(entry, []).append(pick(*args, **kwargs))
            if entry == stop_at:
                raise Stop
            return (instead or real)(*args, **kwargs)

        monkeypatch.setattr(owner, attr, classmethod(spy) if as_classmethod else spy)

    for cls in set(TASKS.values()):
        wrap(cls, "build", "build", lambda cls, name, data, evaluation: (name, data, evaluation), as_classmethod=True)
        wrap(cls, "split", "split", lambda self, model, data, seed: (data, seed))
        wrap(cls, "latent", "latent", lambda self, model, split, params, steps, seed: (steps, seed))
    wrap(pipeline, "localize", "localize", lambda model, inputs, names, settings, seed=0: (settings, seed))
    wrap(text, "general_text", "general_text", lambda model, settings, seed=0: (settings, seed))
    wrap(experiment, "train", "train", lambda model, mask, batches, settings, seed=0, **kw: (settings, seed),
         instead=lambda model, *args, init_params=None, **kw: model.params if init_params is None else init_params)
    wrap(experiment, "relearn", "relearn", lambda model, params, sets, measure, settings, seed=0: (settings, seed))
    wrap(experiment, "train_adversary", "soft_prompt",
         lambda model, params, prompts, labels, settings, seed=0: (settings, seed))
    wrap(experiment, "run_experiment", "run_experiment", lambda model, task, prepared, loc, settings, **kw: loc)
    wrap(runner, "run_unit", "run_unit", lambda *args: threading.current_thread().name)
    wrap(side_effects, "evaluate_mmlu", "mmlu", lambda model, data_dir, params=None, **kw: (data_dir, kw["limit"]))
    wrap(sharding, "make_mesh", "mesh", lambda spec, devices=None: (spec, None))
    wrap(jaxedit, "load", "load", lambda path, dtype="float32": (path, dtype))


def _run(config: dict, folder: Path, monkeypatch, stop_at: str | None) -> dict:
    path = folder / f"{config['name']}-{stop_at}.yaml"
    path.write_text(yaml.safe_dump(config))
    calls = {}
    with monkeypatch.context() as patch:
        _spy(patch, calls, stop_at)
        if stop_at is None:
            run_sweep(load_config(str(path)))
        else:
            with pytest.raises(Stop):
                run_sweep(load_config(str(path)))
    return calls


def _as_config(value):
    """A YAML value as the settings hold it (lists become tuples)."""
    return tuple(_as_config(v) for v in value) if isinstance(value, list) else value


def _set_keys(config: dict) -> dict[str, object]:
    """{dotted key: value} of every key a config sets."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "grid":
            out |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            out[key] = value
    return out


def _check(key: str, value, calls: dict, config: dict):
    """The value `key` was set to, as the entry point it configures saw it (AssertionError otherwise)."""
    section, _, field = key.partition(".")
    special = {
        "name": lambda: (Path(config["output"]) / value / "results.jsonl").is_file(),  # not under 'sweep'
        "output": lambda: (Path(value) / config["name"] / "results.jsonl").is_file(),  # not under 'runs'

        "task": lambda: {name for name, _, _ in calls["build"]} == {value},
        "models": lambda: {path for path, _ in calls["load"]} == set(value),
        "dtype": lambda: {dtype for _, dtype in calls["load"]} == {value},
        "localizations": lambda: set(calls["run_experiment"]) == set(value),
        "seeds": lambda: {seed for _, seed in calls["split"] + calls["train"] + calls["localize"]} == set(value),
        "parallel_units": lambda: len(set(calls["run_unit"])) == value,  # each unit on its own thread
        "grid": lambda: {s.weight_decay for s, _ in calls["train"]} == set(value["train.weight_decay"]),
        "train.preset": lambda: {(s.lr, s.forget_loss_coef) for s, _ in calls["train"]} == {(5e-5, 5.0)},
        "train.preset_model": lambda: {(s.lr, s.forget_loss_coef) for s, _ in calls["train"]} == {(5e-5, 5.0)},
        "eval.probes": lambda: "latent" not in calls,
        "eval.probe_steps": lambda: {steps for steps, _ in calls["latent"]} == {value},
        "eval.mmlu_dir": lambda: {str(d) for d, _ in calls["mmlu"]} == {value},
        "eval.mmlu_limit": lambda: {limit for _, limit in calls["mmlu"]} == {value},
        "eval.n_shots": lambda: {e.n_shots for _, _, e in calls["build"]} == {value},
        "relearn.enabled": lambda: "relearn" not in calls,
        "soft_prompt.enabled": lambda: "soft_prompt" not in calls,
    }
    if key in special:
        assert special[key](), (key, value, calls)
        return
    seen = {getattr(settings, field) for settings, _ in calls[SECTIONS[section]]}
    assert seen == {_as_config(value)}, (key, value, seen)


def test_every_key_of_help_reaches_what_it_configures(tiny_llama_dir, files, tmp_path, monkeypatch, capsys):
    """Preset values: §4.4's table for Gemma-2-9B sports, the 'random' group (lr 5e-5, coefficient 5)."""
    configs = _configs(tiny_llama_dir, files, tmp_path / "runs")
    listed = _help_keys(capsys)
    assert len(listed) > 60
    tested = {}  # {key: (the sweep that checks it, value)}: the first sweep that sets a key checks it
    for run, config in configs.items():
        for key, value in _set_keys(config).items():
            tested.setdefault(key, (run, value))
    untested = sorted(set(listed) - set(tested))
    assert not untested, f"keys --help lists with no liveness check here: {untested}"
    assert sorted(set(tested) - set(listed)) == []
    for key, (run, value) in tested.items():  # every key is set to something other than its default
        assert _as_config(value) != _as_config(listed[key]), (key, value)
    for run, config in configs.items():
        calls = _run(config, tmp_path, monkeypatch, STOP_AT.get(run))
        for key, (owner, value) in tested.items():
            if owner == run:
                _check(key, value, calls, config)
