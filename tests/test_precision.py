"""The sweep's `dtype` is the precision of the whole unit: before-edit metrics, localization, training,
after-edit metrics, probes and both attacks all see parameters of that dtype (not float32 before the edit
and bfloat16 after it, which would mix precision into the edit's effect).

The sweep runs in this process on a tiny random Llama with spies on the experiment's entry points that
record the floating dtypes of the parameters each is handed (and training's result), then run them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import yaml

from conftest import tiny_sweep_config
from jaxedit import experiment
from jaxedit.localize import pipeline
from jaxedit.sweep.config import load_config
from jaxedit.sweep.runner import run_sweep
from jaxedit.tasks import TASKS


def _dtypes(params) -> set[str]:
    return {leaf.dtype.name for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def _spy(monkeypatch, seen: dict) -> None:
    """Wrap the entry points: seen[entry] collects the dtypes of the params each call works on."""

    def wrap(owner, attr, entry, params_of, result_too=False):
        real = getattr(owner, attr)

        def spy(*args, **kwargs):
            seen.setdefault(entry, set()).update(_dtypes(params_of(*args, **kwargs)))
            out = real(*args, **kwargs)
            if result_too:
                seen.setdefault(f"{entry} result", set()).update(_dtypes(out))
            return out

        monkeypatch.setattr(owner, attr, spy)

    wrap(pipeline, "localize", "localize", lambda model, *a, **k: model.params)
    wrap(experiment, "evaluate", "evaluate", lambda model, task, split, params, prefix: params or model.params)
    wrap(experiment, "side_effects", "side effects", lambda model, params, *a, **k: params)
    wrap(experiment, "train", "train", lambda model, *a, init_params=None, **k: init_params or model.params,
         result_too=True)
    wrap(experiment, "relearn", "relearn", lambda model, params, *a, **k: params)
    wrap(experiment, "train_adversary", "soft prompt", lambda model, params, *a, **k: params)
    for cls in set(TASKS.values()):
        wrap(cls, "latent", "probes", lambda self, model, split, params, *a, **k: params)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_stage_of_a_unit_runs_in_the_sweeps_dtype(dtype, tiny_llama_dir, tmp_path, monkeypatch):
    config = tiny_sweep_config(tiny_llama_dir, tmp_path / "runs", dtype=dtype, localizations=["manual_interp"],
                               soft_prompt={"enabled": True, "n_vectors": 2, "steps": 1, "batch_size": 2,
                                            "restarts": 1})
    config["train"] = config["train"] | {"steps": 2, "accumulate": 1}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    seen = {}
    with monkeypatch.context() as patch:
        _spy(patch, seen)
        run_dir = run_sweep(load_config(str(path)))
    assert set(seen) == {"localize", "evaluate", "side effects", "train", "train result", "relearn", "soft prompt",
                         "probes"}
    assert seen == {entry: {dtype} for entry in seen}
    row = (run_dir / "results.jsonl").read_text()
    assert '"before/' in row and '"after/' in row
