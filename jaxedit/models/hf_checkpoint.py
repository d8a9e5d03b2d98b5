"""HF safetensors checkpoints <-> jaxedit params, by one name table per family (numpy only).

Each `Spec` ties one HF tensor to one or more jaxedit leaves (GPT-2's fused `c_attn` feeds
q, k and v); per-layer specs are read for every layer and stacked on a leading L axis. The same
table drives export, so an exported directory round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxedit.errors import JaxeditError
from jaxedit.models.config import ModelConfig
from jaxedit.models.params import _flatten, _unflatten, param_shapes

Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One HF tensor `hf` (with `{i}` for the layer) <-> jaxedit leaves `ours`."""

    hf: str
    ours: tuple[Path_, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf


def _same(path: Path_, hf: str) -> Spec:
    return Spec(hf, (path,), lambda a: (a,), lambda a: a)


def _linear(path: Path_, hf: str, out_split: tuple[int, ...] | None = None) -> Spec:
    """HF Linear weight [out, in] <-> ours [in, *out_split]."""
    def to_ours(w):
        w = w.T
        return (w.reshape(w.shape[0], *out_split) if out_split else w,)

    def to_hf(a):
        return a.reshape(a.shape[0], -1).T

    return Spec(hf, (path,), to_ours, to_hf)


def _linear_heads_in(path: Path_, hf: str, heads: int, head_dim: int) -> Spec:
    """HF o_proj weight [D, H*E] <-> ours [H,E,D]."""
    return Spec(hf, (path,), lambda w: (w.T.reshape(heads, head_dim, -1),), lambda a: a.reshape(heads * head_dim, -1).T)


def _reshaped(path: Path_, hf: str, shape: tuple[int, ...], hf_shape: tuple[int, ...] = (-1,)) -> Spec:
    return Spec(hf, (path,), lambda a: (a.reshape(shape),), lambda a: a.reshape(hf_shape))


# HF per-layer norm name -> ours, by family (those not listed: Llama's pre-norms)
_PRE_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
_SANDWICH_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
                   "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"}
_LAYER_NORMS = {
    "gemma2": _SANDWICH_NORMS,
    "gemma3": _SANDWICH_NORMS,
    "olmo2": {"post_attention_layernorm": "attn_post_norm", "post_feedforward_layernorm": "mlp_post_norm"},
}


def _rotary_specs(cfg: ModelConfig) -> list[Spec]:
    h, k, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pre = "model.layers.{i}."
    attn = ("layers", "attn")
    specs = [
        _same(("embed", "tokens"), "model.embed_tokens.weight"),
        _same(("final_norm", "scale"), "model.norm.weight"),
        _linear(attn + ("wq",), pre + "self_attn.q_proj.weight", (h, e)),
        _linear(attn + ("wk",), pre + "self_attn.k_proj.weight", (k, e)),
        _linear(attn + ("wv",), pre + "self_attn.v_proj.weight", (k, e)),
        _linear_heads_in(attn + ("wo",), pre + "self_attn.o_proj.weight", h, e),
        _linear(("layers", "mlp", "w_gate"), pre + "mlp.gate_proj.weight"),
        _linear(("layers", "mlp", "w_up"), pre + "mlp.up_proj.weight"),
        _linear(("layers", "mlp", "w_down"), pre + "mlp.down_proj.weight"),
    ]
    norms = _LAYER_NORMS.get(cfg.family, _PRE_NORMS)
    specs += [_same(("layers", ours, "scale"), pre + hf + ".weight") for hf, ours in norms.items()]
    if cfg.qk_norm == "per_head":
        specs += [_same(attn + ("q_norm",), pre + "self_attn.q_norm.weight"),
                  _same(attn + ("k_norm",), pre + "self_attn.k_norm.weight")]
    if cfg.qk_norm == "whole":
        specs += [_reshaped(attn + ("q_norm",), pre + "self_attn.q_norm.weight", (h, e)),
                  _reshaped(attn + ("k_norm",), pre + "self_attn.k_norm.weight", (k, e))]
    if cfg.qkv_bias:
        specs += [_reshaped(attn + ("bq",), pre + "self_attn.q_proj.bias", (h, e)),
                  _reshaped(attn + ("bk",), pre + "self_attn.k_proj.bias", (k, e)),
                  _reshaped(attn + ("bv",), pre + "self_attn.v_proj.bias", (k, e))]
    if cfg.out_bias:
        specs.append(_same(attn + ("bo",), pre + "self_attn.o_proj.bias"))
    if cfg.mlp_bias:
        specs += [_same(("layers", "mlp", "b_" + n), pre + f"mlp.{n}_proj.bias") for n in ("gate", "up", "down")]
    if not cfg.tie_embeddings:
        specs.append(_linear(("unembed", "w"), "lm_head.weight"))
    return specs


def _fused_qkv(paths: tuple[Path_, ...], hf: str, heads: int, head_dim: int, d_model: int | None) -> Spec:
    """GPT-NeoX's `query_key_value` weight [H*3*E, D] (bias [H*3*E]: d_model None), per head q, k, v
    <-> ours wq, wk, wv [D,H,E] (bq, bk, bv [H,E])."""
    if d_model is None:
        return Spec(hf, paths, lambda b: tuple(b.reshape(heads, 3, head_dim).transpose(1, 0, 2)),
                    lambda *bs: np.stack(bs, axis=1).reshape(-1))

    def to_ours(w):
        return tuple(w.reshape(heads, 3, head_dim, d_model).transpose(1, 3, 0, 2))

    def to_hf(*ws):
        return np.stack([w.transpose(1, 2, 0) for w in ws], axis=1).reshape(-1, d_model)

    return Spec(hf, paths, to_ours, to_hf)


def _gpt_neox_specs(cfg: ModelConfig) -> list[Spec]:
    h, e, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    pre = "gpt_neox.layers.{i}."
    attn = ("layers", "attn")
    specs = [
        _same(("embed", "tokens"), "gpt_neox.embed_in.weight"),
        _same(("final_norm", "scale"), "gpt_neox.final_layer_norm.weight"),
        _same(("final_norm", "bias"), "gpt_neox.final_layer_norm.bias"),
        _fused_qkv(tuple(attn + (n,) for n in ("wq", "wk", "wv")), pre + "attention.query_key_value.weight", h, e, d),
        _linear_heads_in(attn + ("wo",), pre + "attention.dense.weight", h, e),
        _linear(("layers", "mlp", "w_up"), pre + "mlp.dense_h_to_4h.weight"),
        _same(("layers", "mlp", "b_up"), pre + "mlp.dense_h_to_4h.bias"),
        _linear(("layers", "mlp", "w_down"), pre + "mlp.dense_4h_to_h.weight"),
        _same(("layers", "mlp", "b_down"), pre + "mlp.dense_4h_to_h.bias"),
    ]
    specs += _layer_norms({pre + hf: ours for hf, ours in _PRE_NORMS.items()})
    if cfg.qkv_bias:
        specs.append(_fused_qkv(tuple(attn + (n,) for n in ("bq", "bk", "bv")), pre + "attention.query_key_value.bias",
                                h, e, None))
    if cfg.out_bias:
        specs.append(_same(attn + ("bo",), pre + "attention.dense.bias"))
    if not cfg.tie_embeddings:
        specs.append(_linear(("unembed", "w"), "embed_out.weight"))
    return specs


def _layer_norms(names: dict[str, str]) -> list[Spec]:
    """LayerNorm weight and bias of each HF per-layer norm -> ours (scale, bias)."""
    return [_same(("layers", ours, ours_leaf), hf + "." + hf_leaf) for hf, ours in names.items()
            for ours_leaf, hf_leaf in (("scale", "weight"), ("bias", "bias"))]


def _gpt2_specs(cfg: ModelConfig) -> list[Spec]:
    h, e, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    pre = "transformer.h.{i}."
    attn = ("layers", "attn")
    qkv = tuple(attn + (n,) for n in ("wq", "wk", "wv"))
    qkv_bias = tuple(attn + (n,) for n in ("bq", "bk", "bv"))
    specs = [
        _same(("embed", "tokens"), "transformer.wte.weight"),
        _same(("embed", "positions"), "transformer.wpe.weight"),
        _same(("final_norm", "scale"), "transformer.ln_f.weight"),
        _same(("final_norm", "bias"), "transformer.ln_f.bias"),
        Spec(pre + "attn.c_attn.weight", qkv,
             lambda w: tuple(p.reshape(d, h, e) for p in np.split(w, 3, axis=1)),
             lambda *ws: np.concatenate([w.reshape(d, -1) for w in ws], axis=1)),
        Spec(pre + "attn.c_attn.bias", qkv_bias,
             lambda b: tuple(p.reshape(h, e) for p in np.split(b, 3)),
             lambda *bs: np.concatenate([b.reshape(-1) for b in bs])),
        _reshaped(attn + ("wo",), pre + "attn.c_proj.weight", (h, e, d), (h * e, d)),
        _same(attn + ("bo",), pre + "attn.c_proj.bias"),
        _same(("layers", "mlp", "w_up"), pre + "mlp.c_fc.weight"),
        _same(("layers", "mlp", "b_up"), pre + "mlp.c_fc.bias"),
        _same(("layers", "mlp", "w_down"), pre + "mlp.c_proj.weight"),
        _same(("layers", "mlp", "b_down"), pre + "mlp.c_proj.bias"),
    ]
    specs += _layer_norms({pre + "ln_1": "attn_norm", pre + "ln_2": "mlp_norm"})
    if not cfg.tie_embeddings:
        specs.append(_linear(("unembed", "w"), "lm_head.weight"))
    return specs


def name_table(cfg: ModelConfig) -> list[Spec]:
    """The family's HF tensor names."""
    return {"gpt2": _gpt2_specs, "gpt_neox": _gpt_neox_specs}.get(cfg.family, _rotary_specs)(cfg)


class SafetensorsReader:
    """Tensors of `model.safetensors` or a sharded `model.safetensors.index.json`, by HF name.

    Accepts names with or without a wrapper prefix (`transformer.` for hub GPT-2 files,
    `model.language_model.` for Gemma-3 multimodal checkpoints).
    """

    ALIASES = (("transformer.", ""), ("model.", "model.language_model."), ("lm_head.", "language_model.lm_head."))

    def __init__(self, model_dir: Path):
        self.files = _weight_files(model_dir)
        self.location: dict[str, Path] = {}
        for file in self.files:
            for name in _safe_keys(file):
                self.location[name] = file

    def resolve(self, name: str) -> str | None:
        if name in self.location:
            return name
        for prefix, alias in self.ALIASES:
            if name.startswith(prefix) and alias + name[len(prefix):] in self.location:
                return alias + name[len(prefix):]
        return None

    def get(self, name: str) -> np.ndarray:
        stored = self.resolve(name)
        if stored is None:
            raise JaxeditError(f"tensor {name} missing from the checkpoint in {self.files[0].parent}: "
                               "the weights do not match config.json; re-export or re-download them")
        with safe_open(self.location[stored], framework="numpy") as f:
            return f.get_tensor(stored)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise JaxeditError(f"{index} is not a valid safetensors index: re-download it") from exc
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise JaxeditError(f"no model.safetensors (or sharded index) in {model_dir}: jaxedit reads HF safetensors checkpoints")


def _safe_keys(file: Path) -> list[str]:
    if not file.is_file():
        raise JaxeditError(f"checkpoint shard {file} is missing: re-download the model")
    try:
        with safe_open(file, framework="numpy") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise JaxeditError(f"{file} is not a readable safetensors file ({type(exc).__name__}): re-download it") from exc


def read_params(cfg: ModelConfig, model_dir: str | Path, dtype=np.float32) -> dict:
    """Params tree (numpy arrays of `dtype`) from a HF safetensors checkpoint; every shape checked."""
    reader = SafetensorsReader(Path(model_dir))
    expected = _flatten(param_shapes(cfg))
    flat: dict[Path_, np.ndarray] = {}
    for spec in name_table(cfg):
        layers = range(cfg.n_layers) if spec.layered else [None]
        pieces = [spec.to_ours(_checked_get(reader, spec.hf.format(i=i))) for i in layers]
        for j, path in enumerate(spec.ours):
            parts = [p[j] for p in pieces]
            value = np.stack(parts) if spec.layered else parts[0]
            if value.shape != expected[path]:
                raise JaxeditError(
                    f"shape mismatch for {spec.hf}: checkpoint gives {value.shape} for {'/'.join(path)}, "
                    f"config.json implies {expected[path]}; the checkpoint and config.json disagree"
                )
            flat[path] = value.astype(dtype)
    return _unflatten(flat)


def _checked_get(reader: SafetensorsReader, name: str) -> np.ndarray:
    try:
        return reader.get(name)
    except JaxeditError:
        raise
    except Exception as exc:
        raise JaxeditError(f"cannot read tensor {name} ({type(exc).__name__}: {exc}): the file is corrupt; re-download it") from exc


def hf_state_dict(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """HF-named tensors of a params tree (inverse of `read_params`)."""
    flat = {path: np.asarray(leaf) for path, leaf in _flatten(params).items()}
    out = {}
    for spec in name_table(cfg):
        leaves = [flat[p] for p in spec.ours]
        layers = range(cfg.n_layers) if spec.layered else [None]
        for i in layers:
            parts = [leaf[i] for leaf in leaves] if spec.layered else leaves
            out[spec.hf.format(i=i)] = np.ascontiguousarray(spec.to_hf(*parts))
    return out


def write_safetensors(cfg: ModelConfig, params: dict, out_dir: Path) -> None:
    save_file(hf_state_dict(cfg, params), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
