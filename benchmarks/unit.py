"""A sweep unit timed by stage: `python -m benchmarks.unit [KEY=VALUE ...]`.

Runs `python -m jaxedit.sweep default` with the target budget of the throughput issue (two
localizations, 8 edit steps, 6 LoRA r64 relearning steps, 100 probe steps; extra KEY=VALUE
overrides after it), one unit at a time, in a fresh output folder with the persistent compilation cache on, then prints
each unit's stage times (`time/*` of `results.jsonl`: edit, eval_after, probe, attacks (relearning
and soft prompt), total) with the load average, and appends them to benchmarks/results/results.jsonl.
The first unit pays the compilations; later units of the same model reuse its programs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import suite

TARGET = ("localizations=[manual_interp,random_mlps]", "train.steps=8", "relearn.steps=6", "relearn.lora_rank=64",
          "eval.probe_steps=100", "parallel_units=1")  # one unit at a time: its stage times are its own
STAGES = ("edit", "eval_after", "probe", "attacks", "total")


def main(argv=None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "jaxedit.sweep", "default", *TARGET, *overrides, f"output={out}"]
        print(" ".join(command[1:-1]), flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - start
        if done.returncode:
            return done.returncode
        results = next(Path(out).glob("*/results.jsonl"))
        units = [json.loads(line) for line in results.read_text().splitlines()]
    load = round(os.getloadavg()[0], 2)
    print(f"\nwall {wall:.1f} s (with model load and preparation), load average {load}\n")
    print("| unit | " + " | ".join(f"{s} (s)" for s in STAGES) + " |\n|" + "---|" * (len(STAGES) + 1))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with (suite.HERE / "results" / "results.jsonl").open("a") as f:
        for unit in units:
            times = {s: round(unit.get(f"time/{s}", 0.0), 1) for s in STAGES}
            print(f"| {unit['unit']} | " + " | ".join(str(times[s]) for s in STAGES) + " |")
            f.write(json.dumps({"time": stamp, **suite.machine(), "path": "sweep unit", "unit": unit["unit"],
                                "overrides": [*TARGET, *overrides], "loadavg": load, "wall_s": round(wall, 1),
                                **{f"{s}_s": v for s, v in times.items()}}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
