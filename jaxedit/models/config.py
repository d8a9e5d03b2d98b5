"""ModelConfig: the one static description of a decoder, parsed from a HF `config.json`.

Parsed with plain JSON (importing `transformers` would import torch), accepting both the
transformers 5.x layout (`rope_parameters`, `layer_types`) and older hub configs
(`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jaxedit.errors import JaxeditError

FAMILIES = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "olmo2": "olmo2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
SUPPORTED = ("gpt2, gpt_neox (Pythia), llama (Llama-2/3, SmolLM2), mistral, qwen2 (Qwen2/2.5), qwen3, olmo2, "
             "gemma, gemma2, gemma3_text")
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE of one layer type: base, and HF `rope_type` scaling (`default`, `linear`, `llama3`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [E/2] in float32, as `transformers.modeling_rope_utils` computes them."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_scaling(inv, self)
        return inv


def _llama3_scaling(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama-3.1 frequency-dependent scaling of inverse frequencies [E/2]."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static, hashable description of a decoder-only LM (a `jit` static argument).

    Axes: V vocab, D d_model, L layers, H query heads, K key/value heads, E head_dim, F d_mlp.
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    activation: str
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    norm_offset: float = 0.0  # Gemma norms scale by (1 + w)
    gated_mlp: bool = True
    qkv_bias: bool = False
    out_bias: bool = False  # bias of the attention output projection
    mlp_bias: bool = False
    learned_positions: bool = False
    max_positions: int = 8192
    embed_scale: float = 1.0
    query_scale: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] = ()
    rope_global: RopeConfig | None = None
    rope_local: RopeConfig | None = None
    rotary_dim: int | None = None  # RoPE turns only the first rotary_dim of head_dim (GPT-NeoX); None: all
    pre_norms: bool = True  # norm before attention and MLP (OLMo-2 has none)
    post_norms: bool = False  # norm of what attention and MLP add (Gemma-2/3, OLMo-2)
    qk_norm: str = ""  # RMSNorm of q and k: "per_head" (over E: Gemma-3, Qwen3), "whole" (over H*E: OLMo-2)
    parallel_residual: bool = False  # the MLP reads resid_pre, not resid_mid (GPT-NeoX)
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    hf_config: tuple = ()  # the source config.json items, kept for export

    @property
    def uses_rope(self) -> bool:
        return self.rope_global is not None

    def rope_inv_freq(self) -> np.ndarray:
        """Per-layer inverse RoPE frequencies [L, R/2], R = rotary_dim or E (local layers use the local RoPE)."""
        dim = self.rotary_dim or self.head_dim
        glob = self.rope_global.inv_freq(dim)
        loc = (self.rope_local or self.rope_global).inv_freq(dim)
        return np.stack([loc if is_local else glob for is_local in self.local_layers])

    def hf_dict(self) -> dict:
        return json.loads(dict(self.hf_config)["json"])


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json`; raise JaxeditError naming what is wrong."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise JaxeditError(f"no config.json in {model_dir}: point to a HF model directory or a .gguf file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise JaxeditError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): re-download or fix it") from exc
    return config_from_hf(raw)


def config_from_hf(raw: dict) -> ModelConfig:
    """ModelConfig from a HF config dict of a supported family."""
    raw = dict(raw.get("text_config", raw)) if raw.get("model_type") == "gemma3" else dict(raw)
    model_type = raw.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise JaxeditError(f"unsupported model_type {model_type!r}: jaxedit supports {SUPPORTED}")
    common = {"hf_config": (("json", json.dumps(raw, sort_keys=True)),)}
    builder = {"gpt2": _gpt2, "gpt_neox": _gpt_neox}.get(family, _rotary)
    return builder(raw, family, common)


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise JaxeditError(f"unsupported activation {name!r}: jaxedit supports {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _first_id(value):
    return value[0] if isinstance(value, list) else value


def _token_ids(raw: dict, bos: int | None = None, eos: int | None = None) -> dict:
    """bos / eos / pad token ids (the first of a list), with the config class's defaults."""
    return {"bos_token_id": _first_id(raw.get("bos_token_id", bos)), "eos_token_id": _first_id(raw.get("eos_token_id", eos)),
            "pad_token_id": _first_id(raw.get("pad_token_id"))}


def _sizes(raw: dict) -> dict:
    """Vocabulary, d_model, layers, query heads and d_mlp, as every config but GPT-2's names them."""
    return {"vocab_size": raw["vocab_size"], "d_model": raw["hidden_size"], "n_layers": raw["num_hidden_layers"],
            "n_heads": raw["num_attention_heads"], "d_mlp": raw["intermediate_size"]}


def _gpt2(raw: dict, family: str, common: dict) -> ModelConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(flag):
            raise JaxeditError(f"unsupported GPT-2 option {flag}=true: jaxedit supports the standard GPT-2 attention")
    if raw.get("scale_attn_weights") is False:
        raise JaxeditError("unsupported GPT-2 option scale_attn_weights=false: jaxedit supports scaled attention")
    d, h = raw["n_embd"], raw["n_head"]
    return ModelConfig(
        family=family,
        vocab_size=raw["vocab_size"],
        d_model=d,
        n_layers=raw["n_layer"],
        n_heads=h,
        n_kv_heads=h,
        head_dim=d // h,
        d_mlp=raw.get("n_inner") or 4 * d,
        activation=_activation(raw.get("activation_function", "gelu_new")),
        norm="layernorm",
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        gated_mlp=False,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        learned_positions=True,
        max_positions=raw.get("n_positions", 1024),
        query_scale=(d // h) ** -0.5,
        local_layers=(False,) * raw["n_layer"],
        tie_embeddings=raw.get("tie_word_embeddings", True),
        **_token_ids(raw),
        **common,
    )


def _rope_from_dict(params: dict, theta_default: float) -> RopeConfig:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise JaxeditError(f"unsupported rope_type {rope_type!r}: jaxedit supports {', '.join(ROPE_TYPES)}")
    fields = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor") if k in params}
    if "original_max_position_embeddings" in params:
        fields["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(theta=float(params.get("rope_theta", theta_default)), rope_type=rope_type, **fields)


def _ropes(raw: dict, family: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(global, local) RoPE from either config layout."""
    params = raw.get("rope_parameters") or {}
    if "full_attention" in params:
        local = params.get("sliding_attention")
        return _rope_from_dict(params["full_attention"], 1e6), (_rope_from_dict(local, 1e4) if local else None)
    merged = {**(raw.get("rope_scaling") or {}), **params}
    if "rope_theta" in raw:
        merged.setdefault("rope_theta", raw["rope_theta"])
    merged.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
    if family == "gemma3":
        local = RopeConfig(theta=float(raw.get("rope_local_base_freq", 1e4)))
        return _rope_from_dict(merged, 1e6), local
    return _rope_from_dict(merged, 1e4), None


@dataclasses.dataclass(frozen=True)
class _Rotary:
    """What a rotary family's HF modeling code fixes rather than reads from config.json."""

    qkv_bias: bool | None = None  # None: `attention_bias` puts a bias on q, k, v and o; True: on q, k, v, never o
    qk_norm: str = ""  # see ModelConfig.qk_norm
    pre_norms: bool = True
    post_norms: bool = False
    windows: str = "layer_types"  # which layers slide without `layer_types` (see `_local_layers`)
    gemma: bool = False  # (1 + w) norms, sqrt(d_model) embedding scale
    tied: bool = False  # tie_word_embeddings when config.json omits it
    eps: float = 1e-6  # rms_norm_eps when config.json omits it


_ROTARY = {
    "llama": _Rotary(windows="none"),
    "mistral": _Rotary(windows="all"),
    "qwen2": _Rotary(qkv_bias=True, windows="max_window_layers"),
    "qwen3": _Rotary(qk_norm="per_head", windows="max_window_layers"),
    "olmo2": _Rotary(qk_norm="whole", pre_norms=False, post_norms=True, eps=1e-5),
    "gemma": _Rotary(gemma=True, tied=True),
    "gemma2": _Rotary(post_norms=True, windows="every_2nd", gemma=True, tied=True),
    "gemma3": _Rotary(qk_norm="per_head", post_norms=True, windows="pattern", gemma=True, tied=True),
}


def _local_layers(raw: dict, family: str, n_layers: int) -> tuple[bool, ...]:
    """Which layers use sliding-window attention: as HF's config class and attention module decide it.

    Mistral slides every layer when `sliding_window` is set (it reads no `layer_types`); Qwen2/3 slide
    only with `use_sliding_window`, layers from `max_window_layers` on; the others follow `layer_types`,
    else the family's pattern (Gemma-2 every second layer, Gemma-3 all but every sixth).
    """
    windows = _ROTARY[family].windows
    if windows == "all":
        return (bool(raw.get("sliding_window")),) * n_layers
    if windows == "max_window_layers" and not (raw.get("use_sliding_window") and raw.get("sliding_window")):
        return (False,) * n_layers
    if raw.get("layer_types"):
        return tuple(t == "sliding_attention" for t in raw["layer_types"])
    if windows == "max_window_layers":
        return tuple(i >= raw.get("max_window_layers", 28) for i in range(n_layers))
    if windows == "every_2nd":
        return tuple(i % 2 == 0 for i in range(n_layers))
    if windows == "pattern":
        pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
        return tuple((i + 1) % pattern != 0 for i in range(n_layers))
    if raw.get("sliding_window") and raw.get("use_sliding_window", True) and windows == "none":
        raise JaxeditError(f"unsupported sliding_window for a {family} config: jaxedit supports full attention for {family}")
    return (False,) * n_layers


def _rotary(raw: dict, family: str, common: dict) -> ModelConfig:
    rope_params = raw.get("rope_parameters") or {}
    if raw.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise JaxeditError(f"unsupported partial_rotary_factor != 1 for {family}: jaxedit supports partial RoPE "
                           "for gpt_neox only")
    fam = _ROTARY[family]
    d, h, n_layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
    head_dim = raw.get("head_dim") or d // h
    act = raw.get("hidden_activation") or raw.get("hidden_act", "silu")
    rope_global, rope_local = _ropes(raw, family)
    local = _local_layers(raw, family, n_layers)
    window = raw.get("sliding_window") if any(local) else None
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        family=family,
        **_sizes(raw),
        n_kv_heads=raw.get("num_key_value_heads") or h,
        head_dim=head_dim,
        activation=_activation(act),
        norm="rmsnorm",
        norm_eps=raw.get("rms_norm_eps", fam.eps),
        norm_offset=1.0 if fam.gemma else 0.0,
        qkv_bias=attention_bias if fam.qkv_bias is None else fam.qkv_bias,
        out_bias=attention_bias if fam.qkv_bias is None else False,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        max_positions=raw.get("max_position_embeddings", 8192),
        embed_scale=float(np.float32(d**0.5)) if fam.gemma else 1.0,
        query_scale=(raw.get("query_pre_attn_scalar") or head_dim) ** -0.5 if family != "gemma" else head_dim**-0.5,
        attn_softcap=raw.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_softcap=raw.get("final_logit_softcapping") if family in ("gemma2", "gemma3") else None,
        sliding_window=window,
        local_layers=local,
        rope_global=rope_global,
        rope_local=rope_local,
        pre_norms=fam.pre_norms,
        post_norms=fam.post_norms,
        qk_norm=fam.qk_norm,
        tie_embeddings=raw.get("tie_word_embeddings", fam.tied),
        **_token_ids(raw),
        **common,
    )


def _gpt_neox(raw: dict, family: str, common: dict) -> ModelConfig:
    """GPT-NeoX (Pythia): LayerNorm with bias, partial RoPE, one bias flag for attention, parallel residual.

    Reads both the transformers 5 layout (`rope_parameters` with `partial_rotary_factor`) and hub
    configs (`rotary_pct`, `rotary_emb_base`), with GPTNeoXConfig's defaults (0.25, 10000).
    """
    d, h, n_layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
    head_dim = d // h
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    params.setdefault("rope_theta", raw.get("rotary_emb_base", 10000.0))
    fraction = params.get("partial_rotary_factor", raw.get("rotary_pct", 0.25))
    bias = bool(raw.get("attention_bias", True))
    return ModelConfig(
        family=family,
        **_sizes(raw),
        n_kv_heads=h,
        head_dim=head_dim,
        activation=_activation(raw.get("hidden_act", "gelu")),
        norm="layernorm",
        norm_eps=raw.get("layer_norm_eps", 1e-5),
        gated_mlp=False,
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=True,
        max_positions=raw.get("max_position_embeddings", 2048),
        query_scale=head_dim**-0.5,
        local_layers=(False,) * n_layers,
        rope_global=_rope_from_dict(params, 10000.0),
        rotary_dim=int(head_dim * fraction),
        parallel_residual=bool(raw.get("use_parallel_residual", True)),
        tie_embeddings=raw.get("tie_word_embeddings", False),
        **_token_ids(raw, bos=0, eos=2),
        **common,
    )
