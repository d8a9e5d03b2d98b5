"""The localization pipeline end to end on a tiny random model: what `python -m jaxedit.localize` runs and writes.

Fact lookup → attribution patching → causal tracing → the nine localizations on the built-in sports facts;
parameter counts are checked against counts by hand (from the config) and against the written masks.
"""

import json

import jax
import numpy as np
import pytest

import jaxedit
from jaxedit.localize import pipeline
from jaxedit.localize.__main__ import localize_task, main
from jaxedit.localize.components import PAPER_LOCALIZATIONS
from jaxedit.localize.pipeline import LocalizeSettings
from jaxedit.models.config import config_from_hf
from jaxedit.models.model import Model, export_hf
from jaxedit.models.params import init_params, param_shapes
from jaxedit.tasks import DataSettings, make_task

L, D, H, K, E, F = 4, 32, 4, 2, 8, 48
SETTINGS = LocalizeSettings(ct_samples=2, top_k_heads=1, threshold=0.0)  # this random model's top head is not in layer 0


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_dir):
    """A 4-layer random Llama with SmolLM2's tokenizer (fact lookup needs layers below its receiver)."""
    cfg = config_from_hf(dict(model_type="llama", hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                              num_attention_heads=H, num_key_value_heads=K, head_dim=E, vocab_size=49152,
                              hidden_act="silu", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))
    tiny = Model(cfg, init_params(cfg, jax.random.key(0)), None, source=smollm2_dir)
    return jaxedit.load(export_hf(tiny, tmp_path_factory.mktemp("localize") / "tiny-llama4"))


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("localized") / "run"
    data = DataSettings(n_forget=4, known_threshold=0.0, max_maintain=8)
    summary = localize_task(model, make_task("sports_athletes", data), data, out, True, SETTINGS, 0, "tiny")
    return out, summary


def test_nine_localizations_with_hand_counted_budgets_and_masks(model, written):
    out, summary = written
    locs = summary["localizations"]
    assert list(locs) == list(PAPER_LOCALIZATIONS)
    flu = summary["fact_lookup_layers"]
    assert flu and all(0 <= layer < L for layer in flu)
    mlp = 3 * D * F  # w_up, w_gate, w_down of one layer
    budget = len(flu) * mlp
    assert locs["manual_interp"]["params"] == budget and locs["random_mlps"]["params"] == budget
    assert locs["all_mlps"]["params"] == L * mlp
    assert locs["nonlocalized"]["params"] == L * (2 * D * H * E + 2 * D * K * E + mlp)  # wq, wo; wk, wv; MLP
    for name in ("localized_ap", "localized_ap_mlps", "localized_ct", "localized_ct_mlps", "random"):
        assert locs[name]["budget"] == budget
        assert abs(locs[name]["params"] - budget) <= D * F, name  # within one component (an MLP matrix at most)
    shapes = param_shapes(model.cfg)
    for name in PAPER_LOCALIZATIONS:
        with np.load(out / "masks" / f"{name}.npz") as masks:
            trainable = 0
            for path, mask in masks.items():
                shape = shapes
                for key in path.split("/"):
                    shape = shape[key]
                assert mask.dtype == bool and mask.ndim == len(shape), (name, path)
                assert all(m in (1, s) for m, s in zip(mask.shape, shape)), (name, path, mask.shape, shape)
                trainable += int(np.broadcast_to(mask, shape).sum())
        assert trainable == locs[name]["params"], name


def test_scores_are_finite_and_labelled(model, written):
    out, summary = written
    names = {p.stem for p in (out / "scores").glob("*.json")}
    assert {"extraction_heads", "enrichment_mlps", "atp_attn_z", "atp_mlp_out", "ct_attn_z", "ct_mlp_out",
            "patching_mlp_out", "probe_prompt"} <= names
    sizes = {"layer": L, "head": H}
    for name in names:
        meta = json.loads((out / "scores" / f"{name}.json").read_text())
        with np.load(out / "scores" / f"{name}.npz") as npz:
            values = npz["values"]
        assert np.isfinite(values).all(), name
        assert len(meta["axes"]) == values.ndim and meta["model"] == "tiny" and meta["method"], name
        for axis, size in zip(meta["axes"], values.shape):
            assert sizes.get(axis, size) == size, (name, axis, size)
        if values.ndim in (1, 2):
            assert (out / "plots" / f"{name}.png").stat().st_size > 0
    assert len(summary["atp_mlp_out"]) == len(summary["ct_mlp_out"]) == L
    assert "Fact-lookup layers" in (out / "summary.md").read_text()


def test_only_the_scores_the_localizations_need_are_computed(model):
    inputs = make_task("sports_athletes").localization_inputs(model, make_task("sports_athletes").facts[:3])
    fixed = LocalizeSettings(flu_layers=(1, 2), ct_samples=2)
    assert pipeline.localize(model, inputs, ["manual_interp", "random"], fixed).scores() == {"flu_layers": (1, 2)}
    scores = pipeline.localize(model, inputs, ["localized_ct_mlps"], fixed).scores()
    assert set(scores) == {"flu_layers", "ct_scores"} and scores["ct_scores"]["mlp_out"].shape == (L,)
    assert scores["ct_scores"]["attn_z"].shape == (L, H)


def test_the_command_refuses_an_existing_output(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output directory") and err.count("\n") == 1
