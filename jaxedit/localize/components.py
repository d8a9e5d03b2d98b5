"""From localization scores to trainable-parameter masks (method.md §3.1, §3.5, §3.6).

Components, at three granularities:
  'attn' / 'mlp'        a whole layer: wq, wk, wv, wo / w_up, w_gate, w_down (the paper's unit)
  'wq' … 'w_down'       one whole weight matrix of a layer (the random baseline's unit)
  'head'                query head h: wq[:, h], wo[h], and the k/v slice of its kv head h // G
                        (G = n_heads / n_kv_heads). GQA rule: a kv head becomes trainable as soon as
                        any of its query heads is, and its parameters are counted once, at the
                        first of its query heads taken.
  'neuron'              MLP neuron f: column f of w_up and w_gate, row f of w_down.
Biases, norms, embeddings and the unembedding are never trainable (the paper's models have no
biases; GPT-2's stay frozen too).

Budget (§3.5): components are walked by |score| descending (stable) and taken until their
parameter count reaches the budget, so the total exceeds the budget by less than the last
component taken (rule 'fill', our fix of §10.9). rule='threshold' is the paper's: the |score|
at which the budget is reached becomes a threshold and every component with |score| ≥ it is
taken (ties overshoot). The random baseline is seeded, matrix-level, includes w_gate (fixes of
§10.8/§10.9) and fills the budget the same way.

Masks mirror the params tree; every leaf is a numpy bool array that broadcasts against its
parameter, at head and neuron granularity whatever the components (wq [L,1,H,1], wk/wv [L,1,K,1],
wo [L,H,1,1], w_up/w_gate [L,1,F], w_down [L,F,1]; frozen leaves [1,…,1] False), so masks of
every localization of a model have one shape (one compiled train step). Everything needs shapes only (`params.param_shapes(cfg)`), never weights.
Axes: L layers, D d_model, H heads, K kv heads, E head_dim, F d_mlp.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.models.config import ModelConfig
from jaxedit.models.params import param_shapes

ATTN = ("wq", "wk", "wv", "wo")
MLP = ("w_up", "w_gate", "w_down")
RULES = ("fill", "threshold")
PAPER_LOCALIZATIONS = ("manual_interp", "localized_ap", "localized_ap_mlps", "localized_ct", "localized_ct_mlps",
                       "random", "random_mlps", "all_mlps", "nonlocalized")
_SCORE_AXES = {"attn_q": "H", "attn_k": "K", "attn_v": "K", "attn_z": "H", "mlp_in": "", "mlp_out": "",
               "mlp_hidden": "F"}


@dataclasses.dataclass(frozen=True)
class Components:
    """A list of components as parallel arrays [N]; order matters for budget walks and GQA counting."""

    kind: np.ndarray  # str: 'attn' | 'mlp' | 'head' | 'neuron' | a matrix name
    layer: np.ndarray  # int
    index: np.ndarray  # int: query head or neuron; -1 for whole layers and matrices
    score: np.ndarray  # float; nan where unscored (baselines)

    @classmethod
    def make(cls, kind, layer, index=None, score=None) -> Components:
        layer = np.atleast_1d(np.asarray(layer, np.int64))
        n = layer.shape[0]
        kind = np.broadcast_to(np.asarray(kind, dtype=object), (n,)).copy()
        index = np.full(n, -1, np.int64) if index is None else np.broadcast_to(np.asarray(index, np.int64), (n,)).copy()
        score = np.full(n, np.nan) if score is None else np.broadcast_to(np.asarray(score, np.float64), (n,)).copy()
        return cls(kind, layer, index, score)

    def __len__(self) -> int:
        return self.layer.shape[0]

    def take(self, rows) -> Components:
        return Components(self.kind[rows], self.layer[rows], self.index[rows], self.score[rows])

    def __add__(self, other: Components) -> Components:
        fields = [f.name for f in dataclasses.fields(self)]
        return Components(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in fields))

    def labels(self) -> list[str]:
        """'attn 3', 'mlp 5', 'head 3.2', 'neuron 4.17', 'wq 2'."""
        return [f"{k} {l}" if i < 0 else f"{k} {l}.{i}" for k, l, i in zip(self.kind, self.layer, self.index)]


@dataclasses.dataclass(frozen=True)
class Localization:
    """A named trainable set: its components, mask pytree and trainable parameter count."""

    name: str
    components: Components
    mask: dict
    n_params: int
    budget: int | None = None


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the per-layer weight matrices present in this model: {'wq': (L,D,H,E), …}."""
    layers = param_shapes(cfg)["layers"]
    return {name: layers[group][name] for group, names in (("attn", ATTN), ("mlp", MLP))
            for name in names if name in layers[group]}


def _base_costs(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one component of each kind (a head without its kv slice)."""
    per_layer = {name: math.prod(shape[1:]) for name, shape in _layer_shapes(cfg).items()}
    d, e = cfg.d_model, cfg.head_dim
    return dict(per_layer, attn=sum(per_layer[n] for n in ATTN), mlp=sum(per_layer[n] for n in MLP if n in per_layer),
                head=2 * d * e, neuron=d * sum(n in per_layer for n in MLP))


def _check_kinds(comps: Components, base: dict[str, int]) -> None:
    unknown = set(comps.kind) - set(base)
    if unknown:
        raise JaxeditError(f"unknown component kind(s) {sorted(unknown)} for this model: use one of {', '.join(base)}")


def component_costs(comps: Components, cfg: ModelConfig) -> np.ndarray:
    """Parameters each component adds, in list order [N] (a kv slice counts once, at its first head).

    Assumes no component contains another one of the list (e.g. a head and its whole layer).
    """
    base = _base_costs(cfg)
    _check_kinds(comps, base)
    costs = np.array([base[k] for k in comps.kind], np.int64)
    heads = np.flatnonzero(comps.kind == "head")
    kv_key = comps.layer[heads] * cfg.n_kv_heads + comps.index[heads] // (cfg.n_heads // cfg.n_kv_heads)
    _, first = np.unique(kv_key, return_index=True)
    costs[heads[first]] += 2 * cfg.d_model * cfg.head_dim
    return costs


def trainable_mask(comps: Components, cfg: ModelConfig) -> dict:
    """Mask pytree shaped like the params: broadcasting bool leaves, True = may change."""
    shapes = _layer_shapes(cfg)
    L, H, K, F = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp
    leaf_shape = {"wq": (L, 1, H, 1), "wk": (L, 1, K, 1), "wv": (L, 1, K, 1), "wo": (L, H, 1, 1),
                  "w_up": (L, 1, F), "w_gate": (L, 1, F), "w_down": (L, F, 1)}
    leaves = {name: np.zeros(leaf_shape[name], bool) for name in shapes}
    _check_kinds(comps, _base_costs(cfg))
    for group, names in (("attn", ATTN), ("mlp", MLP)):
        rows = comps.layer[comps.kind == group]
        for name in names:
            if name in leaves:
                leaves[name][rows] = True
    for name in leaves:
        leaves[name][comps.layer[comps.kind == name]] = True
    head = comps.kind == "head"
    layer, h = comps.layer[head], comps.index[head]
    leaves["wq"][layer, 0, h, 0] = leaves["wo"][layer, h, 0, 0] = True
    kv = h // (H // K)
    leaves["wk"][layer, 0, kv, 0] = leaves["wv"][layer, 0, kv, 0] = True
    neuron = comps.kind == "neuron"
    layer, f = comps.layer[neuron], comps.index[neuron]
    for name in ("w_up", "w_gate"):
        if name in leaves:
            leaves[name][layer, 0, f] = True
    leaves["w_down"][layer, f, 0] = True
    return _mask_tree(param_shapes(cfg), leaves)


def trained_leaves(mask: dict) -> dict:
    """Which leaves train (bool per leaf): in layers/attn and layers/mlp, every matrix of the group as
    soon as any of its entries may change (its mask keeps the others exact); elsewhere, any True entry.

    Localizations that touch the same groups then have one trainable structure (one compiled step).
    """
    layers = mask.get("layers", {})
    groups = {g: any(np.any(m) for m in layers.get(g, {}).values()) for g in ("attn", "mlp")}

    def walk(tree: dict, path: tuple[str, ...]) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = walk(value, path + (key,))
            elif path[:1] == ("layers",) and path[1:] in (("attn",), ("mlp",)) and key in ATTN + MLP:
                out[key] = groups[path[1]]
            else:
                out[key] = bool(np.any(value))
        return out

    return walk(mask, ())


def lowest_trained_layer(mask: dict, n_layers: int) -> int:
    """The lowest layer any True entry of a params-shaped mask lets change (n_layers if none; 0 as soon as
    a leaf outside `layers` may change, or a layer leaf broadcasts one entry over all layers)."""
    lowest = n_layers
    for path, leaf in mask_leaves(mask):
        leaf = np.asarray(leaf, bool)
        if not leaf.any():
            continue
        if path[0] != "layers" or leaf.ndim == 0 or leaf.shape[0] == 1:
            return 0
        lowest = min(lowest, int(np.argmax(leaf.reshape(leaf.shape[0], -1).any(axis=1))))
    return lowest


def trained_rows(mask: dict, n_layers: int) -> dict[tuple[str, ...], np.ndarray]:
    """{leaf path: layer rows [k] int32} for the matrices of each trained group ('attn', 'mlp') that a train step
    may hold and update as a slice of the layer stack (`optim.split_trainable`) instead of whole.

    The rows are the layers with a True entry in any matrix of the group, padded with the lowest other layers
    (whose mask is False there, so they keep their bits) to a power of two k ≤ n_layers / 2: a sweep's
    localizations then have a handful of trainable shapes (compiled steps), the rows being data. A group that
    touches more layers, or whose mask broadcasts one entry over all layers, is absent (it trains whole).
    """
    out = {}
    for group, names in (("attn", ATTN), ("mlp", MLP)):
        leaves = {name: np.asarray(m, bool) for name, m in mask.get("layers", {}).get(group, {}).items()
                  if name in names}
        trained = [m for m in leaves.values() if m.any()]
        if not trained or any(m.shape[0] != n_layers for m in trained):
            continue
        used = sorted({int(layer) for m in trained for layer in np.flatnonzero(m.reshape(n_layers, -1).any(axis=1))})
        k = 1 << (len(used) - 1).bit_length()
        if k > n_layers // 2:
            continue
        rows = np.array(sorted(used + [layer for layer in range(n_layers) if layer not in used][:k - len(used)]),
                        np.int32)
        out |= {("layers", group, name): rows for name in leaves}
    return out


def frozen_prefix(mask: dict, n_layers: int) -> int:
    """How many bottom layers a train step may run without a backward pass: `lowest_trained_layer`
    rounded down to a multiple of max(2, ⌈n_layers/4⌉) (it is a static argument, so a sweep builds at
    most 4 variants of a step; a backward through a layer or two is cheaper than another compile)."""
    step = max(2, -(-n_layers // 4))
    return lowest_trained_layer(mask, n_layers) // step * step


def _mask_tree(shapes: dict, leaves: dict[str, np.ndarray], prefix: tuple[str, ...] = ()) -> dict:
    """All-False [1,…,1] leaves, except the layer matrices in `leaves`."""
    out = {}
    for key, value in shapes.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            out[key] = _mask_tree(value, leaves, path)
        elif path[:1] == ("layers",) and path[1:2] in (("attn",), ("mlp",)) and key in leaves:
            out[key] = leaves[key]
        else:
            out[key] = np.zeros((1,) * len(value), bool)
    return out


def mask_leaves(tree, prefix=()):
    """(path tuple, leaf) of a nested mask/params dict, depth first."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from mask_leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def count_trainable(mask: dict, shapes: dict) -> int:
    """Trainable parameters of a mask, given param shapes (tuples, arrays or `jax.ShapeDtypeStruct`s)."""
    masks = dict(mask_leaves(mask))
    total = 0
    for path, leaf in mask_leaves(shapes):
        shape = tuple(leaf) if isinstance(leaf, tuple) else tuple(leaf.shape)
        m = np.asarray(masks.get(path, False))
        if np.broadcast_shapes(m.shape, shape) != shape:
            raise JaxeditError(f"mask leaf {'/'.join(path)} {m.shape} does not broadcast to its parameter {shape}")
        total += int(m.sum()) * (math.prod(shape) // max(m.size, 1))
    return total


def _scores(scores: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    sizes = {"H": (cfg.n_heads,), "K": (cfg.n_kv_heads,), "": (), "F": (cfg.d_mlp,)}
    out = {}
    for key, value in scores.items():
        if key not in _SCORE_AXES:
            raise JaxeditError(f"unknown score key {key!r}: use {', '.join(_SCORE_AXES)}")
        value = np.asarray(getattr(value, "values", value), np.float64)
        want = (cfg.n_layers,) + sizes[_SCORE_AXES[key]]
        if value.shape != want:
            raise JaxeditError(f"scores[{key!r}] has shape {value.shape}, expected {want}: reduce to one score per unit")
        out[key] = value
    return out


def candidates(scores: Mapping, cfg: ModelConfig, *, attn: str | None = "layer", mlp: str | None = "layer",
               mlp_out_only: bool = False) -> Components:
    """Scored components from site scores (§3.5 step 1).

    scores: {'attn_q' [L,H], 'attn_k' [L,K], 'attn_v' [L,K], 'attn_z' [L,H] (head output),
    'mlp_in' [L], 'mlp_out' [L], 'mlp_hidden' [L,F]}, any subset. attn='layer': signed sum over
    heads of every q, k, v, z score present; 'head': q_h + z_h + (k + v of its kv head) / G, so a
    layer's head scores sum to its layer score; None drops attention (the `_mlps` variants).
    mlp='layer': mlp_in + mlp_out (mlp_out alone if mlp_out_only); 'neuron': mlp_hidden; None: none.
    """
    s = _scores(scores, cfg)
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    out = Components.make([], [])
    if attn is not None:
        keys = [k for k in ("attn_q", "attn_k", "attn_v", "attn_z") if k in s]
        if not keys:
            raise JaxeditError("no attention scores (attn_q/k/v/z) given: pass attn=None for an MLP-only localization")
        zero = np.zeros((L, H))
        kv = (s.get("attn_k", np.zeros((L, K))) + s.get("attn_v", np.zeros((L, K)))) / (H // K)
        per_head = s.get("attn_q", zero) + s.get("attn_z", zero) + np.repeat(kv, H // K, axis=1)
        if attn == "layer":
            out += Components.make("attn", np.arange(L), score=per_head.sum(1))
        elif attn == "head":
            layer, head = np.divmod(np.arange(L * H), H)
            out += Components.make("head", layer, head, per_head.ravel())
        else:
            raise JaxeditError(f"attn granularity {attn!r} is not 'layer', 'head' or None")
    if mlp is not None:
        if mlp == "layer":
            keys = ["mlp_out"] if mlp_out_only else [k for k in ("mlp_in", "mlp_out") if k in s]
            if not keys or any(k not in s for k in keys):
                raise JaxeditError("no MLP scores (mlp_in/mlp_out) given: pass mlp=None for an attention-only localization")
            out += Components.make("mlp", np.arange(L), score=sum(s[k] for k in keys))
        elif mlp == "neuron":
            if "mlp_hidden" not in s:
                raise JaxeditError("neuron granularity needs scores['mlp_hidden'] [L,F]")
            layer, neuron = np.divmod(np.arange(L * cfg.d_mlp), cfg.d_mlp)
            out += Components.make("neuron", layer, neuron, s["mlp_hidden"].ravel())
        else:
            raise JaxeditError(f"mlp granularity {mlp!r} is not 'layer', 'neuron' or None")
    return out


def _fill(comps: Components, cfg: ModelConfig, budget: int) -> int:
    """How many leading components it takes for their parameters to reach `budget` (all if never)."""
    if budget <= 0:
        return 0
    reached = np.flatnonzero(np.cumsum(component_costs(comps, cfg)) >= budget)
    return int(reached[0]) + 1 if reached.size else len(comps)


def select(comps: Components, cfg: ModelConfig, budget: int, rule: str = "fill") -> Components:
    """Top components by |score| up to a parameter budget (§3.5 steps 3; see the module doc for rules)."""
    if rule not in RULES:
        raise JaxeditError(f"budget rule {rule!r} is not one of {', '.join(RULES)}")
    if np.isnan(comps.score).any():
        raise JaxeditError("some component scores are NaN: fix the scores before selecting by budget")
    ranked = comps.take(np.argsort(-np.abs(comps.score), kind="stable"))
    n = _fill(ranked, cfg, budget)
    if rule == "threshold" and n:
        n = int(np.sum(np.abs(ranked.score) >= np.abs(ranked.score[n - 1])))
    return ranked.take(np.arange(n))


def mlp_layers(cfg: ModelConfig, layers) -> Components:
    """Whole MLP layers (up, gate, down), e.g. the FLU layers."""
    layers = np.asarray(list(layers), np.int64)
    if layers.size and (layers.min() < 0 or layers.max() >= cfg.n_layers):
        raise JaxeditError(f"MLP layers {layers.tolist()} are outside 0..{cfg.n_layers - 1}")
    return Components.make("mlp", layers)


def flu_budget(cfg: ModelConfig, layers) -> int:
    """Parameter budget = parameters of the FLU MLP layers (#layers × 3 × D × F for gated MLPs)."""
    return int(component_costs(mlp_layers(cfg, layers), cfg).sum())


def random_matrices(cfg: ModelConfig, budget: int, seed: int) -> Components:
    """Seeded random whole matrices of any layer (gate included), taken until the budget is reached."""
    names = list(_layer_shapes(cfg))
    layer, which = np.divmod(np.arange(cfg.n_layers * len(names)), len(names))
    order = np.random.default_rng(seed).permutation(layer.size)
    comps = Components.make(np.array(names, dtype=object)[which[order]], layer[order])
    return comps.take(np.arange(_fill(comps, cfg, budget)))


def random_mlps(cfg: ModelConfig, n_layers: int, seed: int) -> Components:
    """n_layers seeded random whole MLP layers."""
    return mlp_layers(cfg, np.random.default_rng(seed).permutation(cfg.n_layers)[:n_layers])


def all_mlps(cfg: ModelConfig) -> Components:
    return mlp_layers(cfg, range(cfg.n_layers))


def nonlocalized(cfg: ModelConfig) -> Components:
    """Every attention and MLP matrix of every layer (norms and embeddings stay frozen)."""
    return Components.make("attn", np.arange(cfg.n_layers)) + all_mlps(cfg)


def localization(name: str, comps: Components, cfg: ModelConfig, budget: int | None = None) -> Localization:
    mask = trainable_mask(comps, cfg)
    return Localization(name, comps, mask, count_trainable(mask, param_shapes(cfg)), budget)


def paper_localizations(cfg: ModelConfig, flu_layers, *, ap_scores: Mapping | None = None,
                        ct_scores: Mapping | None = None, seed: int = 0, rule: str = "fill") -> dict[str, Localization]:
    """The paper's nine localizations (those with scores given), all matched to the FLU budget.

    ap_scores: attribution-patching site scores (attention q/k/v/z, mlp_in, mlp_out); ct_scores:
    causal-tracing scores (attn_z, mlp_out). AP combines MLP in + out, CT uses mlp_out only (§3.5).
    """
    budget = flu_budget(cfg, flu_layers)
    n_flu = len(set(flu_layers))
    found = {"manual_interp": mlp_layers(cfg, sorted(set(flu_layers)))}
    for method, scores, out_only in (("localized_ap", ap_scores, False), ("localized_ct", ct_scores, True)):
        if scores is not None:
            found[method] = select(candidates(scores, cfg, mlp_out_only=out_only), cfg, budget, rule)
            mlps_only = candidates(scores, cfg, attn=None, mlp_out_only=out_only)
            found[method + "_mlps"] = select(mlps_only, cfg, budget, rule)
    found |= {"random": random_matrices(cfg, budget, seed), "random_mlps": random_mlps(cfg, n_flu, seed),
              "all_mlps": all_mlps(cfg), "nonlocalized": nonlocalized(cfg)}
    return {name: localization(name, found[name], cfg, budget) for name in PAPER_LOCALIZATIONS if name in found}
