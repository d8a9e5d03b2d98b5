"""Fault injection: a tiny sweep stopped again and again, each time resumed with the same command, ends
with the same unit files and results.jsonl as an uninterrupted run, and no unit lost.

The stops are SIGKILL, SIGINT and SIGTERM at points drawn from a seeded generator in each phase of
the run (preparing, prepared, mid-training of each unit, between units, writing the report). A point
is reached by watching the run directory for the file that marks it (a committed training
checkpoint is the `step_<n>` folder with its `state.npz`, renamed into place when complete), so the
points are the run's own states, with no hook in the code. The sweep is `conftest.tiny_sweep_config`
and shares the suite's compilation cache (`conftest.sweep_env`).
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import ROOT, sweep_env, tiny_sweep_config
from jaxedit.sweep.config import load_config
from jaxedit.sweep.units import expand

SEED = 14
INTERRUPTED = "interrupted: run the same command to resume"


def _committed_step(run_dir: Path, unit: str) -> int:
    """The newest committed training checkpoint of `unit` (0: none)."""
    return max((int(p.parent.name.removeprefix("step_")) for p in
                (run_dir / "checkpoints" / unit).glob("partition0/step_*/state.npz")), default=0)


def _points(run_dir: Path, units: list[str], steps: int, rng: random.Random) -> list[tuple[str, object]]:
    """(name, reached(run_dir) → bool) in the order the run reaches them: both preparation points, two
    checkpoint steps of each unit, between the units, the report. A point also counts as reached once
    the run is past it (a kill that lands late stops the run at a later state)."""
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


def _without_times(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def _unit_files(run_dir: Path) -> dict[str, dict]:
    return {p.stem: _without_times(json.loads(p.read_text())) for p in sorted((run_dir / "units").glob("*.json"))}


def _results(run_dir: Path) -> list[dict]:
    return [_without_times(json.loads(line)) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def _sweep(path: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "jaxedit.sweep", str(path)], cwd=ROOT, env=sweep_env(),
                                stdout=out, stderr=subprocess.STDOUT)


def _stop_at(proc: subprocess.Popen, reached, signum: int) -> bool:
    """Send `signum` once `reached()` holds; False when the run ended first."""
    while proc.poll() is None:
        if reached():
            proc.send_signal(signum)
            proc.wait(timeout=300)
            return True
        time.sleep(0.005)
    return False


def test_sweep_interrupted_at_drawn_points_resumes_to_the_uninterrupted_results(tiny_llama_dir, tmp_path):
    steps = 4
    reference_config = tiny_sweep_config(tiny_llama_dir, tmp_path / "reference")
    reference_config["train"] |= {"steps": steps, "checkpoint_every": 1}
    reference = tmp_path / "reference.yaml"
    reference.write_text(yaml.safe_dump(reference_config))
    done = subprocess.run([sys.executable, "-m", "jaxedit.sweep", str(reference)], cwd=ROOT, env=sweep_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(reference_config | {"output": str(tmp_path / "runs")}))
    run_dir = tmp_path / "runs" / "small"
    units = [u.id for u in expand(load_config(str(path)))]
    assert len(units) == 2
    rng = random.Random(SEED)
    points = _points(run_dir, units, steps, rng)
    signals = [signal.SIGKILL] * 5 + [signal.SIGINT] * 2 + [signal.SIGTERM]
    rng.shuffle(signals)
    assert len(points) == len(signals) == 8

    stopped = []
    for n, ((name, reached), signum) in enumerate(zip(points, signals)):
        log = tmp_path / f"log{n}.txt"
        proc = _sweep(path, log)
        kept_before = None
        if signum != signal.SIGKILL:  # what was computed when the signal went must still be there after it
            while proc.poll() is None and not reached():
                time.sleep(0.005)
            kept_before = _kept(run_dir)
        assert _stop_at(proc, reached, signum), f"the run ended before {name}: {log.read_text()[-2000:]}"
        output = log.read_text()
        if signum == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 128 + signum, output[-2000:]
            assert output.strip().splitlines()[-1] == INTERRUPTED and output.count(INTERRUPTED) == 1
            assert "Traceback" not in output
            if kept_before - {"manifest.json"}:  # something was computed: all of it is kept
                assert kept_before <= _kept(run_dir)
        stopped.append(f"{signal.Signals(signum).name} at {name}")

    final = subprocess.run([sys.executable, "-m", "jaxedit.sweep", str(path)], cwd=ROOT, env=sweep_env(),
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    expected_dir = tmp_path / "reference" / "small"
    assert sorted(_unit_files(run_dir)) == sorted(units)  # no unit lost
    assert _unit_files(run_dir) == _unit_files(expected_dir), stopped
    assert _results(run_dir) == _results(expected_dir), stopped
    assert (run_dir / "report" / "summary.md").is_file()
    assert not list((run_dir / "checkpoints").glob("*/*/step_*"))
