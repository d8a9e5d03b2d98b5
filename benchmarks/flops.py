"""Analytic FLOP counts (multiply-add = 2 FLOPs) of the benchmarked programs.

Per layer and token: 2·(matmul params of the layer) for q/k/v/o and the MLP, plus attention
4·T·H·E (scores QKᵀ and the weighted sum AV over all T keys, the causal half not discounted since
the dense kernels compute it). Unembedding 2·D·V per unembedded position. Norms, RoPE, softmax and
biases are left out (a few % at these sizes). A patched forward counts only the layers and rows it
recomputes and the logit columns it reads.
"""

from __future__ import annotations


def layer_params(cfg) -> int:
    """Matmul parameters of one layer."""
    d, h, k, e, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
    return d * h * e + 2 * d * k * e + h * e * d + (3 if cfg.gated_mlp else 2) * d * f


def layers(cfg, b: int, t: int, n: float, keys: int | None = None) -> float:
    """n layers over a batch of b × t query rows attending to `keys` keys each (default t)."""
    return n * b * t * (2 * layer_params(cfg) + 4 * (keys or t) * cfg.n_heads * cfg.head_dim)


def keys_values(cfg, b: int, t: int) -> float:
    """The target run's keys and values at every layer (re-projected once for a position sweep)."""
    return cfg.n_layers * b * t * 2 * 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim


def unembed(cfg, b: int, positions: int, columns: int | None = None) -> float:
    """Logits of `positions` rows per prompt over the vocabulary, or over `columns` token ids only."""
    return 2.0 * cfg.d_model * (columns or cfg.vocab_size) * b * positions


def forward(cfg, b: int, t: int, unembed_positions: int = 1) -> float:
    return layers(cfg, b, t, cfg.n_layers) + unembed(cfg, b, unembed_positions)


def forward_backward(cfg, b: int, t: int) -> float:
    """Forward + backward with gradients for activations and all weights: 3× the forward."""
    return 3 * forward(cfg, b, t)


def last_layer(cfg, b: int, rows: int, read: int, keys: int) -> float:
    """The last layer when only `read` of its `rows` query rows are needed: q/k/v for every row, the rest for those."""
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    projections = 2 * rows * d * (h * e + 2 * k * e)
    rest = 2 * read * (layer_params(cfg) - d * (h * e + 2 * k * e)) + 4 * read * keys * h * e
    return b * (projections + rest)


def sweep(cfg, b: int, t: int, site: str, prefix_reuse: bool, columns: int = 2) -> float:
    """A patching sweep: 2 unpatched forwards + the recomputed work of every site.

    With reuse a site at layer l recomputes layer l, layers l+1..L-2, and of the last layer only
    what its read rows need (`last_layer`), and unembeds the `columns` token ids its metric reads.
    resid_pre by position packs positions p and T-1-p into one run of T+1 rows (2 read) whose
    queries attend to T cached + T+1 packed keys, after re-projecting the target's keys and values.
    Without reuse every site is a full forward unembedding its last position.
    """
    L = cfg.n_layers
    if not prefix_reuse:
        return 2 * forward(cfg, b, t) + L * (t if site == "resid_pre" else cfg.n_heads) * forward(cfg, b, t)
    full_layers, partial_layers = L * (L - 1) // 2 + 1, L - 1
    if site == "resid_pre":
        rows, keys, read, items = t + 1, 2 * t + 1, 2, (t + 1) // 2
        extra = keys_values(cfg, b, t)
    else:
        rows, keys, read, items, extra = t, t, 1, cfg.n_heads, 0.0
    per_item = (layers(cfg, b, rows, full_layers, keys) + partial_layers * last_layer(cfg, b, rows, read, keys)
                + read * unembed(cfg, b, L, columns))
    return 2 * forward(cfg, b, t) + extra + items * per_item


def atp(cfg, b: int, t: int, unembed_positions: int = 1) -> float:
    """Attribution patching: corrupted forward + clean forward + backward to the activations only (≈ 1 forward)."""
    return 3 * forward(cfg, b, t, unembed_positions)


def tracing(cfg, b: int, t: int, samples: int) -> float:
    """trace_components: clean + `samples` noised forwards, then per (layer l, head or MLP) set and
    sample the layers l..L-1."""
    L = cfg.n_layers
    per_sample = (cfg.n_heads + 1) * (layers(cfg, b, t, sum(L - l for l in range(L))) + unembed(cfg, b, L))
    return (1 + samples) * forward(cfg, b, t) + samples * per_sample


def train_step(cfg, b: int, t: int, lora: bool, unembed_positions: int = 1) -> float:
    """Two batches (forget, maintain), each forward + backward to the activations, plus weight
    gradients of the trainable matmuls (all MLPs when masked; LoRA adapters are negligible)."""
    mlp = (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp * cfg.n_layers
    weight_grads = 0.0 if lora else 2.0 * mlp * b * t
    return 2 * (2 * forward(cfg, b, t, unembed_positions) + weight_grads)
