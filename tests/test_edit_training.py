"""Masked training leaves frozen parameters bit-identical; losses equal numpy; LoRA touches only adapters."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxedit import Model
from jaxedit.compilation import CompileCounter
from jaxedit.edit import checkpoints, losses
from jaxedit.edit.lora import apply_lora, init_lora
from jaxedit.edit.optim import AdamWSpec, cosine_schedule, masked_adamw, merge, split_trainable, trainable_part
from jaxedit.edit.train import LoraSpec, LossWeights, TrainSettings, loss_terms, preset, train, train_step
from jaxedit.errors import JaxeditError
from jaxedit.localize import components as C
from jaxedit.localize.components import mask_leaves
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import init_params

CFG = config_from_hf(dict(model_type="llama", hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=4, vocab_size=64, hidden_act="silu"))
B, T = 4, 6



def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.key(0))
    params["unembed"]["w"] = params["unembed"]["w"] * 50  # unit-scale logits, so any target is reachable
    return Model(CFG, params, None)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tok = lambda: jnp.asarray(rng.integers(1, CFG.vocab_size, (B, T)), jnp.int32)  # noqa: E731
    mask = jnp.asarray(np.array([[1] * T, [1] * T, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3]), jnp.int32)
    target = lambda: jnp.asarray(rng.integers(0, CFG.vocab_size, B), jnp.int32)  # noqa: E731
    return {"forget": {"tokens": tok(), "mask": mask, "target": target()},
            "maintain": {"tokens": tok(), "mask": mask, "target": target()},
            "lm": {"tokens": tok(), "mask": mask}}


def _mixed_mask():
    """Head 1.0 (+ its kv head), whole MLP of layer 2, and wv of layer 0: partially trainable leaves."""
    comps = C.Components.make(["head", "mlp", "wv"], [1, 2, 0], [0, -1, -1])
    return C.trainable_mask(comps, CFG)


def test_split_keeps_only_leaves_that_can_change(model):
    mask = _mixed_mask()
    trainable, frozen = split_trainable(model.params, mask)
    kept = {path for path, leaf in mask_leaves(trainable) if leaf is not None}
    want = {path for path, m in mask_leaves(mask) if np.any(m)}
    assert kept == want == {("layers", "attn", n) for n in ("wq", "wk", "wv", "wo")} | {
        ("layers", "mlp", n) for n in ("w_up", "w_gate", "w_down")}
    assert len(jax.tree.leaves(trainable)) == len(want)  # embed, norms: no gradient, no optimizer state
    opt = masked_adamw(trainable_part(mask), 1e-3)
    state_sizes = sum(x.size for x in jax.tree.leaves(opt.init(trainable)) if x.ndim)
    assert state_sizes == 2 * sum(x.size for x in jax.tree.leaves(trainable))
    merged = merge(trainable, frozen)
    for path, leaf in mask_leaves(model.params):
        assert _get(merged, path) is leaf


@pytest.mark.parametrize("dtype, terms", [("float32", ("forget", "maintain", "lm")), ("bfloat16", ("forget",))])
def test_frozen_parameters_bit_identical_after_training(model, batch, dtype, terms):
    """Training runs in the model's dtype: a bfloat16 model trains, and comes back, in bfloat16."""
    model = Model(CFG, jax.tree.map(lambda p: p.astype(dtype), model.params), None)
    mask = _mixed_mask()
    before = jax.tree.map(np.asarray, model.params)
    hp = TrainSettings(lr=1e-2, forget_loss_coef=1.0, kl_coef=0.5 * ("lm" in terms), weight_decay=0.1, accumulate=1,
                       steps=4)
    after = train(model, mask, lambda i: {k: batch[k] for k in terms}, hp, progress=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(after)} == {jnp.dtype(dtype)}
    for path, m in mask_leaves(mask):
        old = before_leaf = _get(before, path)
        new = np.asarray(_get(after, path))
        free = np.broadcast_to(m, old.shape)
        assert np.array_equal(new[~free], old[~free]), path  # frozen entries (and whole frozen leaves)
        if free.any():
            assert not np.array_equal(new[free], old[free]), path  # trainable entries moved
        assert np.array_equal(np.asarray(_get(model.params, path)), before_leaf)  # the model's own params untouched


def test_masks_of_one_group_lrs_and_coefficients_share_one_compiled_step(model, batch):
    """w_down of layer 0, then w_up + w_gate of layer 1 (other matrices of the same group), then neurons, with
    other lrs and forget coefficients: one program; the matrices outside each mask keep their bits. Then
    w_up of layer 2: one more program, the one that runs layers 0-1 without a backward (`frozen_prefix`)."""
    masks = [C.trainable_mask(C.Components.make(kinds, layers, index), CFG) for kinds, layers, index in (
        (["w_down"], [0], None), (["w_up", "w_gate"], [1, 1], None), (["neuron"] * 2, [1, 1], [3, 7]),
        (["w_up"], [2], None))]
    base = jax.tree.map(np.asarray, model.params)
    with CompileCounter() as counter:
        for i, mask in enumerate(masks):
            hp = TrainSettings(lr=1e-2 * (i + 1), forget_loss_coef=1.0 + i, maintain_coef=0.0, lm_coef=0.0,
                               accumulate=1, steps=2, checkpoint_every=0)
            edited = train(model, mask, lambda _: batch, hp, progress=False)
            for path, m in mask_leaves(mask):
                before, after = _get(base, path), np.asarray(_get(edited, path))
                frozen = ~np.broadcast_to(m, before.shape)
                assert np.array_equal(after[frozen], before[frozen]), path
                assert np.any(m) == (not np.array_equal(after, before)), path
            if i == 2:
                assert counter.counts["jit(_train_step)"] == 1
    assert counter.counts["jit(_train_step)"] == 2


def test_lora_changes_only_adapters(model, batch):
    base = jax.tree.map(np.asarray, model.params)
    hp = TrainSettings(lr=1e-2, lora_rank=2, lora_alpha=4.0, accumulate=1, steps=3)
    merged = train(model, None, lambda i: batch, hp, seed=1, progress=False)
    for path, leaf in mask_leaves(model.params):
        assert np.array_equal(np.asarray(leaf), _get(base, path))  # base never written
    for path, leaf in mask_leaves(merged):
        if path[-1] not in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            assert np.array_equal(np.asarray(leaf), _get(base, path)), path
        else:
            assert not np.array_equal(np.asarray(leaf), _get(base, path)), path


def test_lora_side_path_gives_the_merged_computations_loss_and_gradients(model, batch):
    """Training's side path x·W + (x·sA)·B against the loss of the merged weights W + sA@B (an independent
    path), both in float64 so that the comparison is not at float32's rounding level."""
    spec = LoraSpec(3, 8.0)
    weights = LossWeights(forget=1.0, maintain=1.0, lm=1.0)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.params)
        adapters = init_lora(params, spec.rank, jax.random.key(2))
        keys = iter(jax.random.split(jax.random.key(3), 2 * len(adapters)))
        adapters = {name: {k: jax.random.normal(next(keys), v.shape, jnp.float64) * 0.3 for k, v in ab.items()}
                    for name, ab in adapters.items()}

        def side(ad):
            return loss_terms(ad, params, batch, CFG, weights.objective(), weights.coefficients(), spec)[0]

        def merged(ad):
            merged_params = apply_lora(params, ad, spec.alpha, spec.rank)
            total = 0.0
            for name in ("forget", "maintain"):
                b = batch[name]
                total += losses.cross_entropy(losses.last_logits(merged_params, CFG, b["tokens"], b["mask"]),
                                              b["target"])
            lm = batch["lm"]
            return total + losses.lm_loss(losses.next_token_logits(merged_params, CFG, lm["tokens"], lm["mask"]),
                                          lm["tokens"], lm["mask"])

        (got, got_grads), (want, want_grads) = (jax.jit(jax.value_and_grad(f))(adapters) for f in (side, merged))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-10)
        for name in adapters:
            for k in ("a", "b"):
                g, w = np.asarray(got_grads[name][k]), np.asarray(want_grads[name][k])
                assert np.abs(w).max() > 0, (name, k)
                np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-10 * np.abs(w).max(), err_msg=f"{name}.{k}")


def test_lowest_trained_layer_of_masks():
    mask = lambda kinds, layers, index: C.trainable_mask(C.Components.make(kinds, layers, index), CFG)  # noqa: E731
    assert C.lowest_trained_layer(_mixed_mask(), CFG.n_layers) == 0  # wv of layer 0
    assert C.lowest_trained_layer(mask(["head", "mlp"], [2, 1], [3, -1]), CFG.n_layers) == 1
    assert C.lowest_trained_layer(mask(["neuron"], [2], [5]), CFG.n_layers) == 2
    no_layer = mask(["neuron"], [2], [5])
    no_layer["layers"]["mlp"]["w_up"][:] = False
    no_layer["layers"]["mlp"]["w_down"][:] = False
    no_layer["layers"]["mlp"]["w_gate"][:] = False
    assert C.lowest_trained_layer(no_layer, CFG.n_layers) == CFG.n_layers
    no_layer["final_norm"] = jax.tree.map(lambda m: np.ones_like(m), no_layer["final_norm"])
    assert C.lowest_trained_layer(no_layer, CFG.n_layers) == 0  # a leaf outside the stack
    neuron = mask(["neuron"], [2], [5])
    assert C.frozen_prefix(neuron, 3) == 2 and C.frozen_prefix(mask(["mlp"], [1], [-1]), 3) == 0  # steps of 2
    deep = {"layers": {"mlp": {"w_up": np.zeros((18, 1, 1), bool)}}}
    for lowest, prefix in ((2, 0), (4, 0), (5, 5), (9, 5), (10, 10), (17, 15)):  # steps of ⌈18/4⌉ = 5
        deep["layers"]["mlp"]["w_up"][:] = np.arange(18)[:, None, None] == lowest
        assert C.frozen_prefix(deep, 18) == prefix, lowest


def test_frozen_prefix_backward_gives_the_full_backwards_gradients_above_it_and_none_below(model, batch):
    """No backward below layer k: the loss and the gradients of layers ≥ k equal the full backward's
    (an independent path), the gradients of layers < k and of the embedding are exactly zero."""
    mask = jax.tree.map(np.ones_like, C.trainable_mask(C.Components.make(["mlp"], [0], [-1]), CFG))
    trainable, frozen = split_trainable(model.params, mask)  # every parameter, embedding included
    weights = LossWeights(forget=1.0, maintain=1.0, lm=1.0)
    k = 2

    def loss(tr, frozen_below):
        return loss_terms(tr, frozen, batch, CFG, weights.objective(), weights.coefficients(),
                          frozen_below=frozen_below)[0]

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (got, got_grads), (want, want_grads) = grad(trainable, k), grad(trainable, 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for path, g in mask_leaves(got_grads):
        g, w = np.asarray(g), np.asarray(_get(want_grads, path))
        if path[0] == "layers":
            assert not g[:k].any(), path
            assert np.abs(w[k:]).max() > 0, path
            np.testing.assert_allclose(g[k:], w[k:], rtol=1e-5, atol=1e-6 * np.abs(w).max(), err_msg=str(path))
        elif path[0] == "embed":
            assert not g.any() and np.abs(w).max() > 0, path
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(), err_msg=str(path))


def test_frozen_prefix_gradient_equals_float64_finite_differences(model, batch):
    """Along random directions of every parameter at or above layer k, the frozen-prefix gradient's
    directional derivative equals central differences of the plain loss in float64."""
    weights = LossWeights(forget=1.0, maintain=1.0, lm=1.0)
    k, eps = 2, 1e-6
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.params)
        mask = jax.tree.map(np.ones_like, C.trainable_mask(C.Components.make(["mlp"], [0], [-1]), CFG))
        trainable, frozen = split_trainable(params, mask)

        def loss(tr, frozen_below=0):
            return loss_terms(tr, frozen, batch, CFG, weights.objective(), weights.coefficients(),
                              frozen_below=frozen_below)[0]

        grads = jax.jit(jax.grad(loss), static_argnums=1)(trainable, k)
        plain = jax.jit(loss)
        rng = np.random.default_rng(1)
        for _ in range(3):
            def direction(path, a):
                d = rng.normal(size=a.shape)
                if path[0].key == "layers":
                    d[:k] = 0.0
                return jnp.asarray(0.0 * d if path[0].key == "embed" else d)
            d = jax.tree_util.tree_map_with_path(direction, trainable)
            step = lambda sign: jax.tree.map(lambda a, b: a + sign * eps * b, trainable, d)  # noqa: E731
            numeric = (float(plain(step(1))) - float(plain(step(-1)))) / (2 * eps)
            analytic = sum(float((g * v).sum()) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
            assert abs(numeric) > 1e-3
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_lora_merged_view_is_w_plus_scaled_low_rank_map(model):
    adapters = init_lora(model.params, 3, jax.random.key(2))
    assert all(float(jnp.abs(ab["b"]).max()) == 0 for ab in adapters.values())
    assert all(np.array_equal(np.asarray(_get(apply_lora(model.params, adapters, 8.0, 3), p)), np.asarray(leaf))
               for p, leaf in mask_leaves(model.params))  # B = 0: the merged view is the base
    adapters = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape), adapters)
    merged = jax.jit(apply_lora, static_argnums=(2, 3))(model.params, adapters, 8.0, 3)
    attn, mlp = model.params["layers"]["attn"], model.params["layers"]["mlp"]
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=CFG.d_model), rng.normal(size=(CFG.n_heads, CFG.head_dim))
    s, l = 8.0 / 3, 1
    low = lambda name, v: s * (v @ np.asarray(adapters[name]["a"][l])) @ np.asarray(adapters[name]["b"][l])  # noqa
    q = np.einsum("d,dhe->he", x, np.asarray(merged["layers"]["attn"]["wq"][l]))
    np.testing.assert_allclose(q.ravel(), x @ np.asarray(attn["wq"][l]).reshape(CFG.d_model, -1) + low("wq", x),
                               rtol=1e-5, atol=1e-5)
    o = np.einsum("he,hed->d", z, np.asarray(merged["layers"]["attn"]["wo"][l]))
    np.testing.assert_allclose(o, np.einsum("he,hed->d", z, np.asarray(attn["wo"][l])) + low("wo", z.ravel()),
                               rtol=1e-5, atol=1e-5)
    h = rng.normal(size=CFG.d_mlp)
    np.testing.assert_allclose(h @ np.asarray(merged["layers"]["mlp"]["w_down"][l]),
                               h @ np.asarray(mlp["w_down"][l]) + low("w_down", h), rtol=1e-5, atol=1e-5)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_losses_equal_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 7)) * 2
    target = np.array([0, 3, 6, 2])
    logits[2, 6] = -30.0  # log p < -5: this row contributes 0 to the unlearning loss
    weight = np.array([1.0, 1.0, 1.0, 0.0])
    lp = _np_log_softmax(logits)
    p = np.exp(lp[np.arange(4), target])
    np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(target)),
                               -lp[np.arange(4), target].mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(target), jnp.asarray(weight)),
                               -lp[np.arange(3), target[:3]].mean(), rtol=1e-6)
    assert np.log(p[2]) < -5 and np.all(np.log(p[[0, 1, 3]]) >= -5)
    per_row = np.where(np.log(p) < -5, 0.0, -np.log1p(-p))
    np.testing.assert_allclose(losses.log1m_p_loss(jnp.asarray(logits), jnp.asarray(target)), per_row.mean(),
                               rtol=1e-5)
    assert per_row[2] == 0 and per_row[0] > 0
    # LM: next-token CE over real tokens only
    tl = rng.normal(size=(2, 4, 7))
    tokens = np.array([[1, 2, 3, 4, 5], [6, 0, 1, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    lps = _np_log_softmax(tl)
    ce = [-lps[b, t, tokens[b, t + 1]] for b in range(2) for t in range(4) if mask[b, t + 1] and mask[b, t]]
    np.testing.assert_allclose(losses.lm_loss(jnp.asarray(tl), jnp.asarray(tokens), jnp.asarray(mask)), np.mean(ce),
                               rtol=1e-6)
    # KL(reference || edited) over real positions
    ref, new = rng.normal(size=(2, 4, 7)), rng.normal(size=(2, 4, 7))
    pr, lr_, ln = np.exp(_np_log_softmax(ref)), _np_log_softmax(ref), _np_log_softmax(new)
    kl = (pr * (lr_ - ln)).sum(-1)
    np.testing.assert_allclose(losses.kl_loss(jnp.asarray(ref), jnp.asarray(new), jnp.asarray(mask[:, :-1])),
                               kl[mask[:, :-1].astype(bool)].mean(), rtol=1e-6)


def test_clipping_counts_only_trainable_gradients():
    params = {"a": jnp.ones((3, 4)), "b": jnp.ones((2, 5))}
    mask = {"a": np.array([[True], [False], [True]]), "b": np.ones((1, 1), bool)}
    grads = {"a": jnp.asarray(np.arange(12.0).reshape(3, 4) * 100), "b": jnp.full((2, 5), 0.5)}
    updates, _ = masked_adamw(mask, 0.1, clip_norm=0.3).update(grads, masked_adamw(mask, 0.1).init(params), params)
    masked = {"a": grads["a"] * mask["a"], "b": grads["b"]}
    ref_opt = optax.chain(optax.clip_by_global_norm(0.3), optax.adamw(0.1, weight_decay=0.0))
    ref, _ = ref_opt.update(masked, ref_opt.init(params), params)
    np.testing.assert_allclose(updates["a"], ref["a"] * mask["a"], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], ref["b"], rtol=1e-6)
    assert np.all(np.asarray(updates["a"])[1] == 0)
    # with the frozen row in the norm, the clipped gradients would be smaller: Adam's first step differs little,
    # so compare the clipped gradients themselves.
    clip = optax.clip_by_global_norm(0.3)
    unmasked, _ = clip.update(grads, clip.init(params))
    clipped, _ = clip.update(masked, clip.init(params))
    assert not np.allclose(unmasked["b"], clipped["b"])


def test_cosine_schedule_is_torch_cosine_annealing():
    sched = cosine_schedule(2e-5, 50)
    t = np.arange(51)
    np.testing.assert_allclose([sched(i) for i in t], 2e-5 * (1 + np.cos(np.pi * t / 50)) / 2, rtol=1e-5, atol=1e-12)
    with pytest.raises(JaxeditError):
        cosine_schedule(1e-3, 5, warmup=5)


def test_warmup_is_linear_then_cosine_and_takes_a_traced_lr():
    """warmup 4 of 20 steps: lr·t/4, then lr·(1 + cos(π (t − 4) / 16)) / 2, by hand; the lr may be a jitted
    step's data (`train.warmup` once failed there)."""
    t = np.arange(21)
    want = np.where(t < 4, 3e-4 * t / 4, 3e-4 * (1 + np.cos(np.pi * (t - 4) / 16)) / 2)
    got = jax.jit(lambda lr: jax.vmap(cosine_schedule(lr, 20, warmup=4))(jnp.asarray(t)))(jnp.float32(3e-4))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_accumulation_equals_one_step_on_the_joint_batch(model, batch):
    mask = _mixed_mask()
    half = lambda sl: {"forget": {k: v[sl] for k, v in batch["forget"].items()}}  # noqa: E731
    weights = LossWeights(forget=1.0, maintain=0.0, lm=0.0)
    results = []
    for k, parts in ((2, [half(slice(0, 2)), half(slice(2, 4))]), (1, [half(slice(0, 4))])):
        trainable, frozen = split_trainable(model.params, mask)
        trainable = jax.tree.map(jnp.copy, trainable)
        tmask = trainable_part(mask)
        opt = AdamWSpec(clip_norm=None, accumulate=k)
        state = opt.init(trainable)
        for i, part in enumerate(parts):
            prev = jax.tree.map(np.asarray, trainable)
            trainable, state, _ = train_step(trainable, frozen, state, part, CFG, weights, opt, tmask, 1e-2)
            if i < k - 1:
                assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(prev),
                                                                             jax.tree.leaves(trainable)))
        results.append(trainable)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_injection_loss_goes_down(model, batch):
    mask = C.trainable_mask(C.mlp_layers(CFG, [0, 1]), CFG)
    seen = []
    hp = TrainSettings(lr=1e-2, maintain_coef=0.0, lm_coef=0.0, accumulate=1, steps=20)
    train(model, mask, lambda i: {"forget": batch["forget"]}, hp, progress=False,
          on_step=lambda s, m: seen.append(m["forget"]))
    assert len(seen) == 20 and seen[-1] < 0.5 * seen[0]


def test_unlearning_loss_lowers_true_probability(model, batch):
    mask = C.trainable_mask(C.mlp_layers(CFG, [0, 1]), CFG)
    forget = dict(batch["forget"])
    forget["target"] = jnp.argmax(losses.last_logits(model.params, CFG, forget["tokens"], forget["mask"]), -1)
    hp = TrainSettings(lr=3e-3, unlearn=True, maintain_coef=0.0, lm_coef=0.0, accumulate=1, steps=10)
    after = train(model, mask, lambda i: {"forget": batch["forget"], "forget_true": forget}, hp, progress=False)
    p = lambda params: jax.nn.softmax(losses.last_logits(params, CFG, forget["tokens"], forget["mask"]))[  # noqa
        jnp.arange(B), forget["target"]]
    assert np.all(np.asarray(p(after)) < np.asarray(p(model.params)))
    with pytest.raises(JaxeditError, match="forget_true"):  # the injected answers are never unlearned
        train(model, mask, lambda i: {"forget": forget}, hp, progress=False)


def test_presets_and_errors(model):
    assert preset("sports_athletes", "gemma-7b", "manual_interp")["lr"] == 1e-5
    assert preset("sports_athletes", "gemma-7b", "random")["forget_loss_coef"] == 0.1
    assert preset("counterfact_64", "llama-3-8b", "all_mlps") | {} == {
        "lr": 1e-5, "forget_loss_coef": 0.2, "steps": 50, "batch_size": 4, "accumulate": 16, "clip_norm": 1.0}
    with pytest.raises(JaxeditError):
        preset("sports", "gemma-7b", "manual_interp")
    empty = C.trainable_mask(C.Components.make([], []), CFG)
    with pytest.raises(JaxeditError):
        train(model, empty, lambda i: {}, TrainSettings(steps=1), progress=False)
    with pytest.raises(JaxeditError, match="preset"):  # an unresolved preset is never silently ignored
        train(model, _mixed_mask(), lambda i: {}, TrainSettings(steps=1, preset="sports_athletes"), progress=False)
    resolved = TrainSettings(preset="sports_athletes", lr=0.5).for_localization("google/gemma-7b", "random")
    assert (resolved.lr, resolved.forget_loss_coef, resolved.preset) == (1e-5, 0.1, None)
    assert math.isclose(TrainSettings().lr, 1e-5)


def test_training_resumes_from_its_checkpoint(model, batch, tmp_path):
    """A run stopped after step 3 (checkpoint at step 2) and restarted equals an uninterrupted run, and the
    restart runs only steps 3-5: its batch source fails for the micro-batches the checkpoint already holds."""
    mask = _mixed_mask()
    hparams = TrainSettings(lr=1e-2, accumulate=1, steps=5, checkpoint_every=2)
    batches = lambda i: batch  # noqa: E731
    whole = train(model, mask, batches, hparams, progress=False)

    class Stop(Exception):
        pass

    def stop_at_3(step, _):
        if step == 2:  # after optimizer step 3
            raise Stop

    with pytest.raises(Stop):
        train(model, mask, batches, hparams, progress=False, on_step=stop_at_3, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]

    def after_the_checkpoint(i):
        assert i >= 2, f"micro-batch {i} is in the step_2 checkpoint: the restart trained it again"
        return batch

    steps_run = []
    resumed = train(model, mask, after_the_checkpoint, hparams, progress=False, checkpoint_dir=tmp_path,
                    on_step=lambda step, _: steps_run.append(step))
    assert steps_run == [2, 3, 4]  # optimizer steps 3, 4 and 5 (0-based)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, whole), jax.tree.map(np.asarray, resumed))


def test_checkpoint_writer_commits_the_last_save_and_reports_a_failed_write(tmp_path):
    """Writes run behind the caller: leaving the block leaves the last step alone, with the values saved (the
    arrays changed after `save`); a write that fails raises on the caller's thread."""
    state = {"w": jnp.arange(4.0)}
    with checkpoints.Writer(tmp_path) as writer:
        writer.save(1, state, {})
        writer.save(2, {"w": state["w"] + 1}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]
    step, restored, _ = checkpoints.restore_latest(tmp_path, {"w": jnp.zeros(4)}, {})
    assert step == 2 and np.array_equal(restored["w"], np.arange(4.0) + 1)
    (tmp_path / "file").write_text("not a folder")
    writer = checkpoints.Writer(tmp_path / "file" / "ckpt")
    writer.save(1, state, {})
    with pytest.raises(OSError):
        writer.wait()


def test_checkpoint_writer_finishes_its_write_when_leaving_is_interrupted(tmp_path, monkeypatch):
    """Training stops (an exception) and a signal then lands in the wait for the pending write: the write still
    finishes before the exception goes on, so nothing is written after the caller has stopped."""
    write = checkpoints._write

    def slow_write(*args):
        time.sleep(0.3)
        write(*args)

    class Stop(BaseException):
        pass

    def interrupted_once(join):
        calls = []

        def first_call_interrupted():
            calls.append(1)
            if len(calls) == 1:
                raise Stop
            join()
        return first_call_interrupted

    monkeypatch.setattr(checkpoints, "_write", slow_write)
    with pytest.raises(Stop):
        with checkpoints.Writer(tmp_path) as writer:
            writer.save(1, {"w": jnp.arange(4.0)}, {})
            writer._thread.join = interrupted_once(writer._thread.join)
            raise Stop
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"]


def test_trained_rows_by_hand():
    """The layers a group trains, padded with the lowest untouched layers to a power of two ≤ L/2; else absent."""
    def rows(group, name, layers, n_layers=18):
        shape = {"w_up": (n_layers, 1, 8), "wk": (n_layers, 1, 2, 1)}[name]
        leaf = np.zeros(shape, bool)
        leaf[list(layers)] = True
        return C.trained_rows({"layers": {group: {name: leaf, "w_down" if group == "mlp" else "wq":
                                                  np.zeros((1,) * len(shape), bool)}}}, n_layers)

    got = rows("mlp", "w_up", [2, 3])
    assert set(got) == {("layers", "mlp", "w_up"), ("layers", "mlp", "w_down")}  # every matrix of the group
    assert got["layers", "mlp", "w_up"].tolist() == [2, 3] and got["layers", "mlp", "w_down"].tolist() == [2, 3]
    assert rows("attn", "wk", [5, 15, 0])["layers", "attn", "wk"].tolist() == [0, 1, 5, 15]  # 3 → 4: layer 1 added
    assert rows("mlp", "w_up", [7])["layers", "mlp", "w_up"].tolist() == [7]
    assert rows("mlp", "w_up", range(0, 18, 2)) == {}  # 9 layers → 16 > 18 / 2: trains whole
    assert rows("mlp", "w_up", [1, 2], n_layers=3) == {}  # 2 > 3 / 2
    assert C.trained_rows({"layers": {"mlp": {"w_up": np.ones((1, 1, 8), bool)}}}, 18) == {}  # broadcast over layers


def test_a_slice_of_the_layer_stack_trains_as_the_whole_leaf_does(model, batch):
    """Training the layer-1 rows alone (what `train` does) against training the whole stacked leaves under the
    same mask (an independent path): the same params to float32 rounding, frozen layers bit-identical, and
    optimizer state for the trained layer only."""
    mask = C.trainable_mask(C.Components.make(["neuron", "neuron", "attn"], [1, 1, 1], [3, 7, -1]), CFG)
    keep, rows = C.trained_leaves(mask), C.trained_rows(mask, CFG.n_layers)
    assert {path: r.tolist() for path, r in rows.items()} == {
        ("layers", g, n): [1] for g, names in (("attn", C.ATTN), ("mlp", C.MLP)) for n in names}
    weights, spec = LossWeights(forget=1.0, maintain=1.0, lm=1.0), AdamWSpec(steps=3, weight_decay=0.1)
    runs = []
    for r in (rows, None):
        trainable, frozen = split_trainable(model.params, mask, keep, r)
        trainable = jax.tree.map(jnp.copy, trainable)
        tmask, state = trainable_part(mask, keep, r), spec.init(trainable)
        for _ in range(3):
            trainable, state, _ = train_step(trainable, frozen, state, batch, CFG, weights, spec, tmask, 1e-2)
        runs.append((merge(trainable, frozen), sum(x.size for x in jax.tree.leaves(state) if x.ndim)))
    (sliced, sliced_state), (whole, whole_state) = runs
    assert sliced_state * CFG.n_layers == whole_state  # Adam's moments of one layer of three
    for path, leaf in mask_leaves(model.params):
        got, want, old = (np.asarray(_get(t, path)) for t in (sliced, whole, model.params))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg="/".join(path))
        if path[0] == "layers" and path[1] in ("attn", "mlp") and path[2] in C.ATTN + C.MLP:
            assert np.array_equal(got[[0, 2]], old[[0, 2]]), path  # the other layers keep their bits
            assert not np.array_equal(got[1], old[1]), path
