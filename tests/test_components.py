"""Scores -> components -> broadcasting parameter masks, from shapes only; score artifacts on disk."""

import json

import jax
import numpy as np
import pytest

from jaxedit.errors import JaxeditError
from jaxedit.localize import components as C
from jaxedit.localize.artifacts import ScoreArray, data_hash, save_heatmap
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import init_params, param_shapes


def _config(model_type, layers, d, f, heads, kv, head_dim, **extra):
    return config_from_hf(dict(model_type=model_type, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, vocab_size=1000,
                               hidden_activation="gelu_pytorch_tanh", **extra))


GEMMA_7B = _config("gemma", 28, 3072, 24576, 16, 16, 256)
GEMMA2_9B = _config("gemma2", 42, 3584, 14336, 16, 8, 256)
SMALL = _config("llama", 5, 16, 24, 4, 2, 4, hidden_act="silu")  # GQA, G = 2


def _ap_scores(cfg, seed=0):
    rng = np.random.default_rng(seed)
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    return {"attn_q": rng.normal(size=(L, H)), "attn_k": rng.normal(size=(L, K)), "attn_v": rng.normal(size=(L, K)),
            "attn_z": rng.normal(size=(L, H)), "mlp_in": rng.normal(size=L), "mlp_out": rng.normal(size=L),
            "mlp_hidden": rng.normal(size=(L, cfg.d_mlp))}


def _materialized_count(mask, cfg):
    """Independent count: broadcast every leaf to its parameter's full shape and sum."""
    shapes = param_shapes(cfg)
    total = 0
    for path, shape in C.mask_leaves(shapes):
        leaf = mask
        for key in path:
            leaf = leaf[key]
        total += int(np.broadcast_to(leaf, shape).sum())
    return total


def test_gemma_7b_sports_budget_and_baseline_counts_from_shapes_only():
    locs = C.paper_localizations(GEMMA_7B, range(2, 8), seed=0)
    assert C.flu_budget(GEMMA_7B, range(2, 8)) == 6 * 3 * 3072 * 24576 == 1_358_954_496
    assert round(locs["manual_interp"].n_params / 1e9, 3) == 1.359
    assert round(locs["all_mlps"].n_params / 1e9, 2) == 6.34
    assert round(locs["nonlocalized"].n_params / 1e9, 2) == 7.75
    abstract = jax.eval_shape(lambda: init_params(GEMMA_7B, jax.random.key(0)))  # no weights allocated
    for loc in locs.values():
        assert C.count_trainable(loc.mask, abstract) == loc.n_params
    assert round(C.flu_budget(GEMMA2_9B, range(2, 7)) / 1e9, 3) == 0.771  # spec §3.2, Gemma-2-9B sports


@pytest.mark.parametrize("rule", ["fill", "threshold"])
def test_every_method_matches_the_budget_within_one_component(rule):
    cfg, flu = GEMMA2_9B, range(2, 7)
    ap = _ap_scores(cfg)
    ct = {"attn_z": ap["attn_z"] * 0.1, "mlp_out": ap["mlp_out"]}
    locs = C.paper_localizations(cfg, flu, ap_scores=ap, ct_scores=ct, seed=3, rule=rule)
    budget = C.flu_budget(cfg, flu)
    extra = {f"heads_{m}": C.select(C.candidates(ap, cfg, attn="head", mlp=m), cfg, budget, rule)
             for m in ("layer", "neuron")}
    for name, comps in [(k, v.components) for k, v in locs.items() if k not in ("all_mlps", "nonlocalized")] + list(extra.items()):
        n = C.count_trainable(C.trainable_mask(comps, cfg), param_shapes(cfg))
        assert n == C.component_costs(comps, cfg).sum(), name
        last = C.component_costs(comps, cfg)[-1]
        assert 0 <= n - budget < last, (name, n, budget, last)


def test_threshold_rule_takes_ties_fill_rule_stops():
    cfg = SMALL
    scores = {"attn_z": np.zeros((5, 4)), "mlp_out": np.array([3.0, 2.0, 2.0, 2.0, 1.0])}
    budget = 2 * C.flu_budget(cfg, [0])  # two MLP layers
    fill = C.select(C.candidates(scores, cfg), cfg, budget, "fill")
    paper = C.select(C.candidates(scores, cfg), cfg, budget, "threshold")
    assert fill.labels() == ["mlp 0", "mlp 1"]
    assert paper.labels() == ["mlp 0", "mlp 1", "mlp 2", "mlp 3"]


def test_combine_rules():
    cfg = SMALL
    s = _ap_scores(cfg, seed=1)
    layers = C.candidates(s, cfg)
    attn, mlp = layers.score[layers.kind == "attn"], layers.score[layers.kind == "mlp"]
    np.testing.assert_allclose(attn, sum(s[k].sum(1) for k in ("attn_q", "attn_k", "attn_v", "attn_z")))
    np.testing.assert_allclose(mlp, s["mlp_in"] + s["mlp_out"])
    out_only = C.candidates(s, cfg, mlp_out_only=True)
    np.testing.assert_allclose(out_only.score[out_only.kind == "mlp"], s["mlp_out"])
    heads = C.candidates(s, cfg, attn="head", mlp=None)
    assert set(heads.kind) == {"head"}
    np.testing.assert_allclose(heads.score.reshape(5, 4).sum(1), attn)  # head scores add up to the layer's
    assert set(C.candidates(s, cfg, attn=None).kind) == {"mlp"}  # the _mlps variants
    with pytest.raises(JaxeditError, match="expected"):
        C.candidates({"attn_z": np.zeros((5, 3)), "mlp_out": np.zeros(5)}, cfg)


def test_random_localization_is_seeded_and_can_pick_gates():
    cfg, budget = GEMMA2_9B, C.flu_budget(GEMMA2_9B, range(2, 7))
    first, again = C.random_matrices(cfg, budget, seed=11), C.random_matrices(cfg, budget, seed=11)
    assert first.labels() == again.labels()
    assert C.random_matrices(cfg, budget, seed=12).labels() != first.labels()
    assert any("w_gate" in C.random_matrices(cfg, budget, seed=s).kind for s in range(5))
    assert C.random_mlps(cfg, 5, seed=2).labels() == C.random_mlps(cfg, 5, seed=2).labels()
    assert C.random_mlps(cfg, 5, seed=2).labels() != C.random_mlps(cfg, 5, seed=3).labels()


@pytest.mark.parametrize("attn,mlp", [("layer", "layer"), ("head", "neuron"), (None, "layer")])
def test_masks_broadcast_against_params_and_count_like_materialized(attn, mlp):
    cfg = SMALL
    comps = C.select(C.candidates(_ap_scores(cfg, seed=2), cfg, attn=attn, mlp=mlp), cfg,
                     C.flu_budget(cfg, [1, 3]), "fill")
    mask = C.trainable_mask(comps, cfg)
    grads = jax.tree.map(lambda s: np.ones(s, np.float32), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    masked = jax.tree.map(lambda m, g: np.where(m, g, 0.0), mask, grads)  # used as a gradient mask
    assert jax.tree.map(np.shape, masked) == jax.tree.map(np.shape, grads)
    assert sum(int(g.sum()) for g in jax.tree.leaves(masked)) == C.count_trainable(mask, param_shapes(cfg))
    for path, shape in C.mask_leaves(param_shapes(cfg)):
        leaf = mask
        for key in path:
            leaf = leaf[key]
        assert leaf.ndim == len(shape) and leaf.size <= cfg.n_layers * max(cfg.n_heads, cfg.d_mlp), path
        if path[1:2] not in (("attn",), ("mlp",)):
            assert not leaf.any(), path  # norms and embeddings stay frozen
    assert C.count_trainable(mask, param_shapes(cfg)) == _materialized_count(mask, cfg)


def test_gqa_head_rule():
    cfg = SMALL  # 4 query heads share 2 kv heads: heads 2, 3 -> kv head 1
    d, e = cfg.d_model, cfg.head_dim
    comps = C.Components.make("head", [1, 1], [3, 2])
    np.testing.assert_array_equal(C.component_costs(comps, cfg), [4 * d * e, 2 * d * e])
    mask = C.trainable_mask(comps, cfg)
    attn = mask["layers"]["attn"]
    assert attn["wq"][1, 0, :, 0].tolist() == [False, False, True, True]
    assert attn["wo"][1, :, 0, 0].tolist() == [False, False, True, True]
    assert attn["wk"][1, 0, :, 0].tolist() == [False, True] == attn["wv"][1, 0, :, 0].tolist()
    assert not attn["wq"][[0, 2, 3, 4]].any()
    assert C.count_trainable(mask, param_shapes(cfg)) == _materialized_count(mask, cfg) == 6 * d * e


def test_score_array_round_trip_and_heatmap(tmp_path):
    values = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    score = ScoreArray(values, ("layer", "head"), "path_patching/extraction_heads", model="tiny",
                       data_hash=data_hash(["a prompt"], np.arange(3)), labels={"head": ["h0", "h1", "h2", "h3"]},
                       meta={"threshold": 0.02})
    npz, sidecar = score.save(tmp_path / "scores" / "heads.npz")
    assert npz.name == "heads.npz" and sidecar.name == "heads.json"
    assert json.loads(sidecar.read_text())["axes"] == ["layer", "head"]
    back = ScoreArray.load(tmp_path / "scores" / "heads")
    np.testing.assert_array_equal(back.values, values)
    assert back.values.dtype == np.float32
    assert (back.axes, back.method, back.model, back.data_hash, back.git_sha, back.labels, back.meta) == (
        score.axes, score.method, score.model, score.data_hash, score.git_sha, score.labels, score.meta)
    assert data_hash(["a prompt"], np.arange(3)) != data_hash(["a prompt"], np.arange(4))
    png = save_heatmap(score, tmp_path / "heads.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(JaxeditError, match="axis names"):
        ScoreArray(values, ("layer",), "x")
