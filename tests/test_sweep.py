"""`python -m jaxedit.sweep` end to end on a tiny random Llama with a real tokenizer.

The reference is an uninterrupted single-process run of the same config; a run stopped at 8 drawn
points (SIGKILL, SIGINT, SIGTERM: fault injection) and resumed each time, a run on 8 CPU devices with
sharded parameters and batches (data=2 × fsdp=2 × tensor=2), and a run split over 2 processes
through `jax.distributed`, both killed mid-training and restarted, must give the same rows.
Bad inputs give one line and write nothing.

Time goes to XLA compiles, so the runs share a persistent compilation cache (`conftest.sweep_env`): the
2-process run goes first (see `two_processes`) and the reference loads most of its executables from
there. The 8-device run starts after the reference and goes on beside the other tests (a second core).
"""

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, sweep_env, tiny_sweep_config
from jaxedit.sweep import __main__ as sweep_cli
from jaxedit.sweep.config import load_config
from jaxedit.sweep.units import expand


def _write(tmp_path, config: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _run(args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxedit.sweep", *map(str, args)], cwd=ROOT, env=env or sweep_env(),
                          capture_output=True, text=True, timeout=timeout)


def _start(args, env: dict, log: Path) -> subprocess.Popen:
    """`python -m jaxedit.sweep ARGS` in the background, its stdout and stderr into the file `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "jaxedit.sweep", *map(str, args)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _assert_same_rows(a: list[dict], b: list[dict], rtol: float = 0.0) -> None:
    assert [r["unit"] for r in a] == [r["unit"] for r in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            if isinstance(x[key], float) or (isinstance(x[key], list) and x[key] and isinstance(x[key][0], float)):
                np.testing.assert_allclose(x[key], y[key], rtol=rtol, atol=rtol, err_msg=key)
            else:
                assert x[key] == y[key], key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _committed_steps(run_dir: Path) -> dict[str, int]:
    """Unit → its newest committed training checkpoint step."""
    steps = {}
    for state in (run_dir / "checkpoints").glob("*/partition0/step_*/state.npz"):
        unit, step = state.parents[2].name, int(state.parent.name.removeprefix("step_"))
        steps[unit] = max(step, steps.get(unit, 0))
    return steps


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_llama_dir):
    """The config split over 2 processes through `jax.distributed`, both killed (SIGKILL) once each has
    committed a training checkpoint of its unit, then both restarted: (exit codes, restart logs, run dir,
    unit → the step its checkpoint held at the kill).

    It runs first, both processes with empty caches: process 1 cannot load single-process executables
    (a CPU executable is keyed by its device), and a process 0 that did would reach the final barrier
    more than its 30 s timeout before process 1. Process 0's executables then go to the shared cache.
    """
    tmp = tmp_path_factory.mktemp("processes")
    path = _write(tmp, tiny_sweep_config(tiny_llama_dir, tmp / "runs"))
    run_dir = tmp / "runs" / "small"

    def start(logs):
        address = f"localhost:{_free_port()}"
        return [_start([path], sweep_env(tmp / "xla", JAXEDIT_CACHE=str(tmp / "cache"), JAX_COORDINATOR_ADDRESS=address,
                                         JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), JAXEDIT_DEBUG="1"), log)
                for i, log in enumerate(logs)]

    procs = start([tmp / f"killed{i}.txt" for i in range(2)])
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs) and len(_committed_steps(run_dir)) < 2:
        time.sleep(0.02)
    for p in procs:
        p.kill()
        p.wait()
    killed_at = _committed_steps(run_dir)
    logs = [tmp / f"process{i}.txt" for i in range(2)]
    procs = start(logs)
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:  # running still only if a process hung
            if p.poll() is None:
                p.kill()
                p.wait()
    if (tmp / "xla").is_dir():
        shutil.copytree(tmp / "xla", sweep_env()["JAX_COMPILATION_CACHE_DIR"], dirs_exist_ok=True)
    return codes, [log.read_text() for log in logs], run_dir, killed_at


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, two_processes):
    """An uninterrupted run: (config dict, rows, run dir). It runs after the 2-process run (same config),
    whose process 0 compiled most of its programs."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny_sweep_config(tiny_llama_dir, tmp / "runs")
    done = _run([_write(tmp, config)])
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp / "runs" / "small"
    assert "report/summary.md" in done.stdout
    return config, _rows(run_dir), run_dir


@pytest.fixture(scope="module")
def eight_devices(reference, tmp_path_factory):
    """The reference's config on 8 CPU devices (params and batches sharded), started in the background
    (awaited by its test): (process, log, run dir). It reads the general text the reference sampled; its compilation
    cache is its own (its sharded programs are in no other run's, and it runs beside runs using the shared one)."""
    config, _, _ = reference
    tmp = tmp_path_factory.mktemp("eight")
    config = dict(config, output=str(tmp / "runs"), mesh={"data": 2, "fsdp": 2, "tensor": 2})
    env = sweep_env(tmp / "xla", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = _start([_write(tmp, config)], env, tmp / "log.txt")
    yield proc, tmp / "log.txt", tmp / "runs" / "small"
    if proc.poll() is None:  # its test did not wait for it
        proc.kill()
        proc.wait()


@pytest.mark.usefixtures("eight_devices")  # started here: it runs beside the tests below
def test_sweep_writes_rows_report_and_manifest(reference):
    config, rows, run_dir = reference
    units = [u.id for u in expand(load_config(str(run_dir.parent.parent / "sweep.yaml")))]
    assert [r["unit"] for r in rows] == sorted(units)
    for row in rows:
        for key in ("forget", "maintain", "edit", "mcq_forget", "mcq_edit", "probe_gt_last", "relearn_forget",
                    "after/general/kl", "after/general/accuracy", "selection_score"):
            assert np.isfinite(row[key]), key
        assert row["n_forget"] == 4 and row["n_maintain_train"] == 8 and row["n_maintain_test"] == 2
    assert np.isfinite(rows[0]["before/general/accuracy"]) and "before/general/kl" not in rows[0]
    assert rows[0]["after/general/kl"] > 0  # the edit moved the model on general text
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["train"]["steps"] == 4 and manifest["versions"]["jax"]
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "| manual_interp |" in summary and "| random |" in summary
    assert (run_dir / "report" / "bars_0.png").stat().st_size > 1000
    assert not list((run_dir / "checkpoints").glob("*/*/step_*"))  # finished units leave no checkpoint


def test_rerun_resumes_and_repeats_nothing(reference, tmp_path):
    config, rows, run_dir = reference
    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "units").glob("*.json")}
    again = _run([run_dir.parent.parent / "sweep.yaml"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 already done" in again.stderr
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (run_dir / "units").glob("*.json")}


def _saved_steps(log: str, unit: str) -> list[int]:
    """Optimizer steps whose training checkpoint a run saved for `unit` (its JAXEDIT_DEBUG notes)."""
    return [int(line.split("saved step ")[1].split()[0]) for line in log.splitlines()
            if "checkpoint: saved step" in line and f"/{unit}/" in line]


SEED = 14  # draws the stop points and the order of the signals
INTERRUPTED = "interrupted: run the same command to resume"


def _committed_step(run_dir: Path, unit: str) -> int:
    """The newest committed training checkpoint of `unit` (0: none); committed = `step_<n>` holds its
    `state.npz` (the folder is renamed into place once complete)."""
    return max((int(p.parent.name.removeprefix("step_")) for p in
                (run_dir / "checkpoints" / unit).glob("partition0/step_*/state.npz")), default=0)


def _stop_points(run_dir: Path, units: list[str], steps: int, rng: random.Random) -> list[tuple[str, object]]:
    """(name, reached() -> bool) in the order the run reaches them: preparing, prepared, two drawn committed
    checkpoint steps of each unit, between the units, writing the report. A point also counts as reached once
    the run is past it (a signal that lands late stops the run at a later state)."""
    def done(unit):
        return lambda: (run_dir / "units" / f"{unit}.json").is_file()

    def at_step(unit, step):
        return lambda: _committed_step(run_dir, unit) >= step or done(unit)()

    points = [("preparing", lambda: (run_dir / "manifest.json").is_file()),
              ("prepared", lambda: any((run_dir / "prep").glob("*.json")))]
    for k, unit in enumerate(units):
        if k:
            points.append((f"between units (after {units[k - 1]})", done(units[k - 1])))
        for step in sorted(rng.sample(range(1, steps), 2)):  # a checkpoint is saved after steps 1 .. steps-1
            points.append((f"training {unit}, step {step} committed", at_step(unit, step)))
    points.append(("writing the report", lambda: (run_dir / "results.jsonl").is_file()))
    return points


def _kept(run_dir: Path) -> set[str]:
    """Files a stop must keep: the manifest, preparations, finished units."""
    return {str(p.relative_to(run_dir)) for pattern in ("manifest.json", "prep/*.json", "units/*.json")
            for p in run_dir.glob(pattern)}


def _unit_files(run_dir: Path) -> dict[str, dict]:
    return {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("time/")}
            for p in sorted((run_dir / "units").glob("*.json"))}


def test_sweep_stopped_at_drawn_points_resumes_to_the_uninterrupted_run(reference, tmp_path):
    """Fault injection: SIGKILL at 5, SIGINT at 2 and SIGTERM at 1 drawn points (watched in the run directory,
    no hook in the code), each followed by the same command: a run after a kill mid-training resumes from the
    committed checkpoint (it saves only later steps), an interrupt keeps what was computed, and the last run
    ends with the reference's unit files and results.jsonl, no unit lost."""
    config, rows, expected_dir = reference
    steps = config["train"]["steps"]
    assert config["train"]["checkpoint_every"] == 1
    path = _write(tmp_path, dict(config, output=str(tmp_path / "runs")))
    run_dir = tmp_path / "runs" / "small"
    units = [r["unit"] for r in rows]
    rng = random.Random(SEED)
    points = _stop_points(run_dir, units, steps, rng)
    signals = [signal.SIGKILL] * 5 + [signal.SIGINT] * 2 + [signal.SIGTERM]
    rng.shuffle(signals)
    assert len(points) == len(signals) == 8
    env = sweep_env(JAXEDIT_DEBUG="1")
    resumes = {}  # unit -> the committed step the next run must resume from
    for n, ((name, reached), signum) in enumerate(zip(points, signals)):
        log = tmp_path / f"log{n}.txt"
        proc = _start([path], env, log)
        while proc.poll() is None and not reached():
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before {name}: {log.read_text()[-2000:]}"
        kept = _kept(run_dir)
        proc.send_signal(signum)
        proc.wait(timeout=300)
        output = log.read_text()
        for unit, step in resumes.items():  # the unit in flight at the last stop went on from its checkpoint
            if _saved_steps(output, unit) or (run_dir / "units" / f"{unit}.json").is_file():  # (if it got that far)
                assert f"resuming training from its checkpoint at step {step}" in output, output[-2000:]
                assert min(_saved_steps(output, unit), default=steps) > step
        if signum == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 128 + signum and "Traceback" not in output, output[-2000:]
            assert output.strip().splitlines()[-1] == INTERRUPTED and output.count(INTERRUPTED) == 1
            if kept - {"manifest.json"}:  # something was computed: all of it is kept
                assert kept <= _kept(run_dir)
        resumes = {u: _committed_step(run_dir, u) for u in units
                   if _committed_step(run_dir, u) and not (run_dir / "units" / f"{u}.json").is_file()}
    final = _run([path], env=env)
    assert final.returncode == 0, final.stderr[-3000:]
    for unit, step in resumes.items():
        assert f"resuming training from its checkpoint at step {step}" in final.stderr
        assert _saved_steps(final.stderr, unit) == list(range(step + 1, steps))  # only the steps after it ran
    assert sorted(_unit_files(run_dir)) == sorted(units)  # no unit lost
    assert _unit_files(run_dir) == _unit_files(expected_dir)
    _assert_same_rows(_rows(run_dir), rows)
    assert (run_dir / "report" / "summary.md").is_file()
    assert not list((run_dir / "checkpoints").glob("*/*/step_*"))


def test_two_units_at_a_time_interrupted_mid_training_resume_to_the_reference(reference, tmp_path):
    """`parallel_units: 2`: both units train at once; SIGINT once each has committed a training checkpoint (or
    finished) ends the run with its one line, and the rerun, again two at a time, resumes the unit in flight from
    its checkpoint and gives the reference's rows."""
    config, rows, _ = reference
    path = _write(tmp_path, dict(config, output=str(tmp_path / "runs"), parallel_units=2))
    run_dir = tmp_path / "runs" / "small"
    units = [r["unit"] for r in rows]
    done = lambda unit: (run_dir / "units" / f"{unit}.json").is_file()  # noqa: E731
    env = sweep_env(JAXEDIT_DEBUG="1")
    proc = _start([path], env, tmp_path / "log.txt")
    while proc.poll() is None and not all(_committed_step(run_dir, u) or done(u) for u in units):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    output = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in output, output[-2000:]
    assert output.strip().splitlines()[-1] == INTERRUPTED
    in_flight = {u: _committed_step(run_dir, u) for u in units if _committed_step(run_dir, u) and not done(u)}
    assert in_flight, "every unit finished before the interrupt: nothing was tested"
    final = _run([path], env=env)
    assert final.returncode == 0, final.stderr[-3000:]
    for unit, step in in_flight.items():
        assert f"resuming training from its checkpoint at step {step}" in final.stderr
    _assert_same_rows(_rows(run_dir), rows)


def test_two_processes_through_jax_distributed_resume_their_own_training_and_match_one(reference, two_processes):
    _, rows, _ = reference
    codes, outputs, run_dir, killed_at = two_processes
    assert codes == [0, 0], [out[-2000:] for out in outputs]
    assert "1 on this process" in outputs[0] and "1 on this process" in outputs[1]
    units = [r["unit"] for r in rows]
    assert sorted(killed_at) == units, "the kill came before each process had a checkpoint of its unit"
    steps = reference[0]["train"]["steps"]
    for output, unit in zip(outputs, units):  # process i owns unit i (`process_slice`)
        assert f"resuming training from its checkpoint at step {killed_at[unit]}" in output
        assert _saved_steps(output, unit) == list(range(killed_at[unit] + 1, steps))  # only later steps ran
    _assert_same_rows(_rows(run_dir), rows)


@pytest.mark.parametrize("case", ["yaml", "key", "model", "unknown_facts", "mesh", "localization", "override",
                                  "output", "repeated_model", "moved_key", "dtype", "parallel_units"])
def test_bad_input_gives_one_line_and_writes_nothing(case, tmp_path, tiny_llama_dir, capsys):
    config = tiny_sweep_config(tiny_llama_dir, tmp_path / "runs")
    args, expect = None, None
    if case == "yaml":
        path = tmp_path / "bad.yaml"
        path.write_text("name: x\ntrain: {steps: 3\n")
        args, expect = [str(path)], "not valid YAML at line"
    elif case == "key":
        config["train"]["setps"] = 3
        args, expect = [str(_write(tmp_path, config))], "did you mean 'train.steps'"
    elif case == "model":
        config["models"] = [str(tmp_path / "no-such-model")]
        args, expect = [str(_write(tmp_path, config))], "unknown model"
    elif case == "unknown_facts":
        config["data"]["known_threshold"] = 0.99  # a random model knows no athlete
        args, expect = [str(_write(tmp_path, config))], "team-sport athletes"
    elif case == "mesh":
        config["mesh"] = {"data": 3, "fsdp": 1, "tensor": 1}
        args, expect = [str(_write(tmp_path, config))], "needs 3 devices"
    elif case == "localization":
        config["localizations"] = ["manual_interpp"]
        args, expect = [str(_write(tmp_path, config))], "did you mean 'manual_interp'"
    elif case == "override":
        args, expect = [str(_write(tmp_path, config)), "train.steps"], "is not key=value"
    elif case == "output":
        args, expect = [str(_write(tmp_path, config)), "output=/proc/none/x"], "cannot create the run directory"
    elif case == "moved_key":
        config["train"]["dtype"] = "bfloat16"
        args, expect = [str(_write(tmp_path, config))], "is now 'dtype': set dtype=bfloat16"
    elif case == "dtype":
        args, expect = [str(_write(tmp_path, config)), "dtype=float16"], "use one of float32, bfloat16"
    elif case == "parallel_units":
        args, expect = [str(_write(tmp_path, config)), "parallel_units=0"], "run at least 1 unit at a time"
    elif case == "repeated_model":
        config["models"] = config["models"] * 2
        args, expect = [str(_write(tmp_path, config))], "more than once"
    assert sweep_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ") and expect in err[-1], err
    assert not any(line.startswith("error") for line in err[:-1])
    assert not (tmp_path / "runs" / "small").exists()


@pytest.mark.parametrize("models", [["/x/a/model", "/x/b/model"], ["org1/m", "org2/m"]])
def test_models_with_the_same_directory_name_get_their_own_units(models):
    units = expand(load_config(None, [f"models={models}", "localizations=[random, manual_interp]", "seeds=[0, 1]",
                                     "train.preset=null"]))
    ids, preps = [u.id for u in units], {u.prep_id for u in units}
    assert len(set(ids)) == len(ids) == 8  # 2 models × 2 seeds × 2 localizations, none standing for another
    assert len(preps) == 4  # each (model, seed) its own preparation
    for model in models:
        mine = [u.id for u in units if u.model == model]
        assert len(mine) == 4 and all(i.startswith(model.rsplit("/", 1)[1] + "-") for i in mine)
    single = expand(load_config(None, [f"models={models[:1]}", "localizations=[random]", "seeds=[0]",
                                       "train.preset=null"]))
    assert [u.id for u in single] == [f"{models[0].rsplit('/', 1)[1]}__s0__random"]  # no digest without a collision


@pytest.mark.parametrize("changed", ["git_revision", "versions"])
def test_resuming_a_run_of_other_code_needs_resume_anyway(reference, tmp_path, changed, capsys):
    config, rows, run_dir = reference
    config = dict(config, output=str(tmp_path / "runs"))
    path = _write(tmp_path, config)
    copy = tmp_path / "runs" / "small"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["output"] = config["output"]
    now = manifest[changed]["jax"] if changed == "versions" else manifest[changed]
    then = "0.0.1" if changed == "versions" else "0" * 40
    if changed == "versions":
        manifest["versions"]["jax"] = then
    else:
        manifest["git_revision"] = then
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "results.jsonl").unlink()
    assert sweep_cli.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"{then} → {now}" in err[-1] and "--resume-anyway" in err[-1], err
    assert not (copy / "results.jsonl").exists()  # refused before anything ran
    assert sweep_cli.main([str(path), "--resume-anyway"]) == 0
    assert json.loads((copy / "manifest.json").read_text())["resumed_anyway"][0][changed] != then
    _assert_same_rows(_rows(copy), rows)


def test_counterfact_sequential_sweep_edits_four_partitions(tiny_llama_dir, tmp_path):
    config = tiny_sweep_config(tiny_llama_dir, tmp_path / "runs", task="counterfact_sequential",
                               localizations=["manual_interp"],
                               data={"n_forget": 8, "pool_size": 2, "max_maintain": 10, "known_threshold": 0.0},
                               eval={"n_shots": 1, "probes": False})
    config["relearn"]["enabled"] = False
    done = _run([_write(tmp_path, config)])
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = _rows(tmp_path / "runs" / "small")
    assert len(row["components"]) == 4  # one localization per partition (§4.5)
    assert row["n_forget"] == 8 and row["n_forget_test"] == 8
    for key in ("forget", "edit", "maintain", "paraphrase", "neighborhood_edit", "mcq_forget"):
        assert 0.0 <= row[key] <= 1.0, key


def test_plan_gives_per_device_memory_of_gemma2_9b_on_eight_devices():
    from jaxedit.sweep.plan import plan

    text = plan(load_config("gemma2_9b_sports"))
    n_params = 9_241_705_984  # Gemma-2-9B: 42 × (attention + MLP + 2·2 norms) + embeddings, bf16
    per_device_gib = n_params * 2 / 8 / 2**30
    params_line = next(line for line in text.splitlines() if line.startswith("params"))
    assert float(params_line.split()[-1]) == pytest.approx(per_device_gib, abs=0.01)
    assert "8 devices" in text and "FLU MLPs [2, 3, 4, 5, 6]" in text


def test_eight_devices_with_sharded_params_match_one_device(reference, eight_devices):
    _, rows, _ = reference
    proc, log, run_dir = eight_devices
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["devices"]["local_devices"] == 8
    _assert_same_rows(_rows(run_dir), rows, rtol=2e-5)
