"""Export round trip through transformers, orbax save/restore, and bad-input errors."""

import json
import shutil
import sys
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxedit
from jaxedit import JaxeditError
from tiny_models import hf_forward, padded_batch, save_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma2")
    save_hf_model("gemma2", path)
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama_mha", "gemma3"])
def test_export_round_trip_through_transformers(family, tmp_path):
    save_hf_model(family, tmp_path / "src")
    model = jaxedit.load(tmp_path / "src")
    edited = jax.tree.map(lambda a: a * 1.01, model.params)  # export what an edit produced
    out = jaxedit.export_hf(model, tmp_path / "exported", params=edited)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids, mask = padded_batch("right")
    ours, _ = model.forward(ids, params=edited, attention_mask=mask)
    ref = hf_forward(hf, ids, mask).logits.numpy()
    assert np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max() <= 1e-4
    assert jax.tree.all(jax.tree.map(np.array_equal, jaxedit.load(out).params, edited))


def test_export_refuses_existing_directory(tiny_dir, tmp_path):
    model = jaxedit.load(tiny_dir)
    (tmp_path / "taken").mkdir()
    with pytest.raises(JaxeditError, match="already exists"):
        jaxedit.export_hf(model, tmp_path / "taken")


def test_orbax_save_restore_is_exact(tiny_dir, tmp_path):
    params = jaxedit.load(tiny_dir, dtype="bfloat16").params
    jaxedit.save_params(params, tmp_path / "ckpt")
    restored = jaxedit.restore_params(tmp_path / "ckpt", like=params)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), params, restored))


def test_loading_does_not_import_torch(tiny_dir):
    code = f"import sys, jaxedit; m = jaxedit.load({str(tiny_dir)!r}); m.forward([[1, 2, 3]]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_missing_directory(tmp_path):
    with pytest.raises(JaxeditError) as excinfo:
        jaxedit.load(tmp_path / "nowhere")
    assert "nowhere" in _one_line(excinfo)


def test_unsupported_model_type(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"model_type": "mamba"}))
    with pytest.raises(JaxeditError) as excinfo:
        jaxedit.load(tmp_path / "m")
    assert "mamba" in _one_line(excinfo) and "gemma2" in str(excinfo.value)


def test_unsupported_config_field(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(JaxeditError) as excinfo:
        jaxedit.load(tmp_path / "m")
    assert "yarn" in _one_line(excinfo) and "llama3" in str(excinfo.value)


def test_corrupt_safetensors(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(JaxeditError) as excinfo:
        jaxedit.load(tmp_path / "m")
    assert "re-download" in _one_line(excinfo)


def test_shape_mismatch(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"intermediate_size": 40}))
    with pytest.raises(JaxeditError) as excinfo:
        jaxedit.load(tmp_path / "m")
    assert "shape mismatch" in _one_line(excinfo)


def test_unknown_site_is_one_clear_line(tiny_dir):
    model = jaxedit.load(tiny_dir)
    with pytest.raises(JaxeditError) as excinfo:
        model.forward(jnp.ones((1, 3), jnp.int32), capture=("resid_pr",))
    assert "resid_pre" in _one_line(excinfo)
