"""Convert a llama.cpp GGUF file (Llama, Qwen2 or Gemma-3 text) into a Hugging Face model directory.

The result (`config.json`, float32 `model.safetensors`, tokenizer files) is what
`transformers` builds itself from the GGUF with `GgufConfig(dequantize=True)`: the same
dequantized tensors bit for bit, under the `LlamaForCausalLM` / `Qwen2ForCausalLM` /
`Gemma3ForCausalLM` names.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

from jaxedit.errors import JaxeditError
from jaxedit.io import say, staged

SUPPORTED_ARCHITECTURES = ("llama", "gemma3", "qwen2")
CONVERTER_VERSION = 2  # part of the cache key: bump when the output of a conversion changes

_LAYER_NAMES = {  # GGUF `blk.{i}.<part>` -> HF `model.layers.{i}.<name>`
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_ARCH_LAYER_NAMES = {
    "llama": {**_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"},
    "qwen2": {**_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"},  # and attn_{q,k,v}.bias
    "gemma3": {
        **_LAYER_NAMES,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_TOKEN_IDS = {  # HF config key -> GGUF `tokenizer.ggml.<key>`
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "padding_token_id",
    "unk_token_id": "unknown_token_id",
}
_GEMMA3_SLIDING_PATTERN = 6  # every 6th layer is global; llama.cpp hard-codes this for gemma3 too
# What AutoTokenizer picks for the HF model type (`llama` is not in its table, so it falls back to the backend)
_TOKENIZER_CLASSES = {"llama": "TokenizersBackend", "qwen2": "Qwen2Tokenizer", "gemma3": "GemmaTokenizer"}


def convert_gguf_to_hf_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir` (must not exist) as a HF directory equivalent to the GGUF file.

    Built in a temporary folder next to `out_dir` and renamed into place at the end, so an
    interrupted conversion never leaves a partial `out_dir`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise JaxeditError(f"conversion target {out_dir} already exists: remove it or choose another directory")
    start = time.perf_counter()
    say(f"reading {gguf_path.name}")
    reader = _open(gguf_path)
    meta = _checked_metadata(reader)
    try:
        config = hf_config(meta, reader)
    except KeyError as exc:
        raise JaxeditError(f"{gguf_path.name} lacks {exc} in its GGUF metadata or tensors: re-export it") from exc
    say(f"dequantizing {len(reader.tensors)} tensors to float32")
    tensors = hf_tensors(reader, meta["general.architecture"], config)
    with staged(out_dir, directory=True, keep_existing=True) as staging:  # a concurrent conversion may win
        say(f"writing model.safetensors ({sum(t.nbytes for t in tensors.values()) / 2**20:.0f} MiB)")
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        say("building the tokenizer with transformers (slow for large vocabularies)")
        _save_tokenizer(reader, staging)
    say(f"converted {gguf_path.name} in {time.perf_counter() - start:.0f} s -> {out_dir}")
    return out_dir


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise JaxeditError(f"no GGUF file at {path}: check the path")
    try:
        return gguf.GGUFReader(path)
    except ValueError as exc:
        raise JaxeditError(f"{path} is not a readable GGUF file ({exc}): point to a llama.cpp .gguf") from exc


def _checked_metadata(reader: gguf.GGUFReader) -> dict:
    """Scalar metadata fields of a supported architecture (arrays such as the vocabulary are
    skipped); float32 values keep their shortest decimal spelling (1e-05, not 9.999999747378752e-06)."""
    meta = {}
    for key, field in reader.fields.items():
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            continue
        value = field.contents()
        meta[key] = float(str(np.float32(value))) if kind == gguf.GGUFValueType.FLOAT32 else value
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise JaxeditError(
            f"GGUF architecture {arch!r} is not supported: jaxedit converts {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise JaxeditError(f"GGUF rope scaling {scaling!r} is not supported: use a model without rope scaling")
    return meta


def hf_config(meta: dict, reader: gguf.GGUFReader) -> dict:
    """The HF `config.json` dict for the GGUF's architecture."""
    arch = meta["general.architecture"]
    shapes = {t.name: t.shape for t in reader.tensors}  # GGUF order: [D, V] for the embedding
    common = {
        "vocab_size": int(shapes["token_embd.weight"][1]),
        "hidden_size": meta[f"{arch}.embedding_length"],
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": meta[f"{arch}.attention.head_count"],
        "num_key_value_heads": meta[f"{arch}.attention.head_count_kv"],
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": False,
        "dtype": "float32",
    }
    ids = {hf: meta.get(f"tokenizer.ggml.{key}") for hf, key in _TOKEN_IDS.items()}
    common |= {hf: token_id for hf, token_id in ids.items() if token_id is not None}
    return {"llama": _llama_config, "qwen2": _qwen2_config, "gemma3": _gemma3_config}[arch](meta, common)


def _llama_config(meta: dict, common: dict) -> dict:
    head_dim = meta.get("llama.rope.dimension_count", common["hidden_size"] // common["num_attention_heads"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "mlp_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": meta.get("llama.rope.freq_base", 10000.0)},
    }


def _qwen2_config(meta: dict, common: dict) -> dict:
    """Qwen2 config: Qwen2Config has no attention_bias (q, k, v always carry one) and no head_dim."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **{k: v for k, v in common.items() if k != "attention_bias"},
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": meta.get("qwen2.rope.freq_base", 10000.0)},
    }


def _gemma3_config(meta: dict, common: dict) -> dict:
    """Gemma-3 text config. query_pre_attn_scalar = head_dim, as llama.cpp uses for all sizes but 27B."""
    head_dim = meta["gemma3.attention.key_length"]
    is_global = [(i + 1) % _GEMMA3_SLIDING_PATTERN == 0 for i in range(common["num_hidden_layers"])]
    swa_theta = meta.get("gemma3.rope.freq_base_swa", 1e4)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **common,
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": meta["gemma3.attention.sliding_window"],
        "layer_types": ["full_attention" if g else "sliding_attention" for g in is_global],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": meta.get("gemma3.rope.freq_base", 1e6)},
            "sliding_attention": {"rope_type": "default", "rope_theta": swa_theta},
        },
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
    }


def hf_tensors(reader: gguf.GGUFReader, arch: str, config: dict) -> dict[str, np.ndarray]:
    """All tensors, dequantized to float32 [out, in] (HF layout), fixed up and under HF names."""
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = data.astype(np.float32, copy=False).reshape(shape)
        out[_hf_name(arch, tensor.name)] = np.ascontiguousarray(_fix_up(arch, tensor.name, weight, config))
    return out


def _hf_name(arch: str, name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, `token_embd.weight` -> ..."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _ARCH_LAYER_NAMES[arch]:
        return f"model.layers.{parts[1]}.{_ARCH_LAYER_NAMES[arch][parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise JaxeditError(f"GGUF tensor {name!r} has no HF counterpart for {arch}: this variant is not supported")


def _fix_up(arch: str, name: str, weight: np.ndarray, config: dict) -> np.ndarray:
    """Undo llama.cpp's storage changes: Llama Q/K RoPE row order; Gemma's `1 + w` norm weights."""
    if arch == "llama" and ".attn_q." in name:
        return _unpermute_rope_rows(weight, config["num_attention_heads"])
    if arch == "llama" and ".attn_k." in name:
        return _unpermute_rope_rows(weight, config["num_key_value_heads"])
    if arch == "gemma3" and name.endswith("norm.weight"):
        return weight - 1
    return weight


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*E, D] with rows per head interleaved (x0,y0,x1,y1,..) -> HF halves (x0,x1,..,y0,y1,..)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _save_tokenizer(reader: gguf.GGUFReader, out_dir: Path) -> None:
    """transformers' own GGUF tokenizer, saved as `tokenizer.json` & co, built without torch.

    `AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives the same files, but its GGUF reader
    imports torch; so this is `gguf_tokenizer_mapping.get_gguf_tokenizer` on the `gguf` package's
    reader, then the class `AutoTokenizer` picks for the model type, built around the result.
    """
    import transformers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece unless told not to
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None

    architecture = reader.fields["general.architecture"].contents()
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tokenizer_class = getattr(transformers, _TOKENIZER_CLASSES[architecture])
    tokenizer = tokenizer_class(tokenizer_object=backend, **tokenizer_config, **extra)
    tokenizer.save_pretrained(str(out_dir))
