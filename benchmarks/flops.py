"""Analytic FLOP counts (multiply-add = 2 FLOPs) of the benchmarked programs.

Per layer and token: 2·(matmul params of the layer) for q/k/v/o and the MLP, plus attention
4·T·H·E (scores QKᵀ and the weighted sum AV over all T keys, the causal half not discounted since
the dense kernels compute it). Unembedding 2·D·V per unembedded position. Norms, RoPE, softmax and
biases are left out (a few % at these sizes). A patched forward counts only the layers it recomputes.
"""

from __future__ import annotations


def layer_params(cfg) -> int:
    """Matmul parameters of one layer."""
    d, h, k, e, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
    return d * h * e + 2 * d * k * e + h * e * d + (3 if cfg.gated_mlp else 2) * d * f


def layers(cfg, b: int, t: int, n: float) -> float:
    """n layers over a batch [b,t]."""
    return n * b * t * (2 * layer_params(cfg) + 4 * t * cfg.n_heads * cfg.head_dim)


def unembed(cfg, b: int, positions: int) -> float:
    return 2.0 * cfg.d_model * cfg.vocab_size * b * positions


def forward(cfg, b: int, t: int, unembed_positions: int = 1) -> float:
    return layers(cfg, b, t, cfg.n_layers) + unembed(cfg, b, unembed_positions)


def forward_backward(cfg, b: int, t: int) -> float:
    """Forward + backward with gradients for activations and all weights: 3× the forward."""
    return 3 * forward(cfg, b, t)


def sweep(cfg, b: int, t: int, site: str, prefix_reuse: bool) -> float:
    """A patching sweep: 2 unpatched forwards + per site the recomputed layers and one unembedding.

    resid_pre at layer l with reuse recomputes layers l..L-1; attn_z at layer l recomputes l..L-1 too
    (the block from its cached input). Without reuse every site is a full forward.
    """
    n_cols = t if site == "resid_pre" else cfg.n_heads
    L = cfg.n_layers
    recomputed = sum(L - l for l in range(L)) if prefix_reuse else L * L
    return 2 * forward(cfg, b, t) + n_cols * (layers(cfg, b, t, recomputed) + unembed(cfg, b, L))


def atp(cfg, b: int, t: int, unembed_positions: int = 1) -> float:
    """Attribution patching: corrupted forward + clean forward + backward to the activations only (≈ 1 forward)."""
    return 3 * forward(cfg, b, t, unembed_positions)


def tracing(cfg, b: int, t: int, samples: int) -> float:
    """trace_components: clean + `samples` noised forwards, then per (layer l, head or MLP) set and
    sample the layers l..L-1."""
    L = cfg.n_layers
    per_sample = (cfg.n_heads + 1) * (layers(cfg, b, t, sum(L - l for l in range(L))) + unembed(cfg, b, L))
    return (1 + samples) * forward(cfg, b, t) + samples * per_sample


def train_step(cfg, b: int, t: int, lora: bool) -> float:
    """Two batches (forget, maintain), each forward + backward to the activations, plus weight
    gradients of the trainable matmuls (all MLPs when masked; LoRA adapters are negligible)."""
    mlp = (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp * cfg.n_layers
    weight_grads = 0.0 if lora else 2.0 * mlp * b * t
    return 2 * (2 * forward(cfg, b, t) + weight_grads)
