"""Fact lookup: probes against a scipy reference, path patching against loops of explicitly edited forwards."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxedit
from jaxedit import SiteEdit
from jaxedit.interventions import one_layer_edit
from jaxedit.localize import fact_lookup as flu
from jaxedit.localize.path_patching import enrichment_mlp_scores, extraction_head_scores
from jaxedit.localize.probes import probe_accuracy, train_test_rows
from jaxedit.readout import resid_at
from tiny_models import VOCAB, save_hf_model

# ---------------------------------------------------------------- probes


def _reference_probe_accuracy(x, y, n_classes, seed, C=1.0):
    """Test accuracy of an L-BFGS-B (scipy) multinomial logistic regression, same split and objective."""
    train, test = train_test_rows(len(y), seed)
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    n, d = len(train), x.shape[1]
    onehot = np.eye(n_classes)[y[train]]

    def loss(theta):
        w, b = theta[: d * n_classes].reshape(d, n_classes), theta[d * n_classes:]
        logits = x[train] @ w + b
        logits = logits - logits.max(1, keepdims=True)
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        value = -np.log(p[np.arange(n), y[train]]).mean() + 0.5 / (C * n) * np.sum(w * w)
        g = (p - onehot) / n
        return value, np.concatenate([(x[train].T @ g + w / (C * n)).ravel(), g.sum(0)])

    theta = scipy.optimize.minimize(loss, np.zeros(d * n_classes + n_classes), jac=True, method="L-BFGS-B",
                                    options={"maxiter": 1000, "gtol": 1e-10}).x
    w, b = theta[: d * n_classes].reshape(d, n_classes), theta[d * n_classes:]
    return ((x[test] @ w + b).argmax(1) == y[test]).mean()


@pytest.fixture(scope="module")
def probe_data():
    rng = np.random.default_rng(0)
    n, d, c = 2000, 12, 3
    y = rng.integers(0, c, n)
    centers = rng.normal(size=(c, d))
    separable = 3.0 * centers[y] + 0.3 * rng.normal(size=(n, d))
    noisy = 0.6 * centers[y] + rng.normal(size=(n, d))
    pure_noise = rng.normal(size=(n, d))
    return np.stack([separable, noisy, pure_noise]).astype(np.float32), y


def test_probe_accuracy_matches_numpy_reference(probe_data):
    x, y = probe_data
    result = probe_accuracy(x, y, seed=3)
    reference = [_reference_probe_accuracy(x[layer].astype(np.float64), y, 3, seed=3) for layer in range(3)]
    n_test = len(result.test_index)
    ours, theirs = np.rint(result.test_accuracy * n_test), np.rint(np.array(reference) * n_test)  # correct counts
    assert result.test_accuracy[0] >= 0.99
    assert np.abs(ours - theirs).max() <= 1  # at most one borderline test point differs


def test_probe_on_random_labels_is_near_chance(probe_data):
    x, _ = probe_data
    labels = np.random.default_rng(7).integers(0, 3, x.shape[1])
    acc = probe_accuracy(x, labels, seed=1).test_accuracy
    assert np.all(np.abs(acc - 1 / 3) < 0.08), acc  # 400 test points: std of chance accuracy ≈ 0.024


def test_vmapped_probes_equal_per_layer_fits(probe_data):
    x, y = probe_data
    together = probe_accuracy(x, y, seed=5)
    for layer in range(x.shape[0]):
        alone = probe_accuracy(x[layer:layer + 1], y, seed=5)
        assert alone.test_accuracy[0] == together.test_accuracy[layer]
        assert alone.train_accuracy[0] == together.train_accuracy[layer]


# ---------------------------------------------------------------- path patching


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Gemma-2 (GQA, post-norms, soft-caps, a sliding window shorter than the prompts) and aligned
    clean/corrupt batches (left padding) with a logit-diff metric."""
    path = tmp_path_factory.mktemp("gemma2")
    save_hf_model("gemma2", path)
    model = jaxedit.load(path)
    rng = np.random.default_rng(1)
    b, t = 4, 8
    mask = np.ones((b, t), np.int32)
    mask[1, :2] = mask[3, :1] = 0
    clean = np.where(mask, rng.integers(3, VOCAB, (b, t)), 0).astype(np.int32)
    subject = np.zeros((b, t), bool)
    subject[:, 3:5] = True
    corrupt = np.where(subject, rng.integers(3, VOCAB, (b, t)), clean).astype(np.int32)
    last = np.full((b, 1), t - 1)
    logits, _ = model.forward(clean, attention_mask=mask, logit_positions=last)
    order = np.argsort(-np.asarray(logits[:, 0]), axis=-1)
    answer, others = order[:, 0], order[:, 5:7]
    return model, clean, corrupt, mask, answer, others


def _ld(logits, answer, others):
    logits = np.asarray(logits)[:, -1]
    rows = np.arange(len(answer))
    return logits[rows, answer] - logits[rows[:, None], others].mean(1)


@pytest.fixture(scope="module")
def reference(setup):
    """Unpatched clean and corrupt runs: logit diffs and numpy caches (full length)."""
    model, clean, corrupt, mask, answer, others = setup
    sites = ("attn_z", "mlp_out", "resid_pre", "resid_post")
    clean_logits, clean_cache = model.forward(clean, attention_mask=mask, capture=sites)
    corrupt_logits, corrupt_cache = model.forward(corrupt, attention_mask=mask, capture=sites)
    as_np = lambda cache: {k: np.asarray(v) for k, v in cache.items()}  # noqa: E731
    return _ld(clean_logits, answer, others), _ld(corrupt_logits, answer, others), as_np(clean_cache), as_np(corrupt_cache)


def _extraction_loop(setup, reference) -> np.ndarray:
    """Extraction-head scores [L,H] from a Python loop of forwards: every head frozen at its corrupted z (all
    positions), except the sender, which takes its clean z."""
    model, clean, corrupt, mask, answer, others = setup
    cfg = model.cfg
    ld_clean, ld_corrupt, clean_cache, corrupt_cache = reference
    expected = np.zeros((cfg.n_layers, cfg.n_heads))
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            value = corrupt_cache["attn_z"].copy()
            value[layer, :, :, head] = clean_cache["attn_z"][layer, :, :, head]
            edits = {"attn_z": SiteEdit(mask=jnp.ones((1,) * 5, bool), value=value)}
            logits, _ = model.forward(corrupt, attention_mask=mask, edits=edits)
            ld = _ld(logits, answer, others)
            expected[layer, head] = ((ld - ld_corrupt.mean()) / (ld_clean.mean() - ld_corrupt.mean())).mean()
    return expected


def _enrichment_loop(setup, reference, receiver: int) -> np.ndarray:
    """Enrichment-MLP scores [L] from a Python loop: the receiver's input gets one MLP's clean − corrupt output."""
    model, clean, corrupt, mask, answer, others = setup
    cfg = model.cfg
    ld_clean, ld_corrupt, clean_cache, corrupt_cache = reference
    expected = np.zeros(cfg.n_layers)
    for layer in range(receiver):
        value = corrupt_cache["resid_pre"][receiver] + clean_cache["mlp_out"][layer] - corrupt_cache["mlp_out"][layer]
        edits = one_layer_edit("resid_pre", receiver, cfg.n_layers, jnp.ones((1, 1, 1), bool), value)
        logits, _ = model.forward(corrupt, attention_mask=mask, edits=edits)
        ld = _ld(logits, answer, others)
        expected[layer] = ((ld - ld_corrupt.mean()) / (ld_clean.mean() - ld_corrupt.mean())).mean()
    return expected


def test_extraction_heads_equal_loop_of_frozen_head_forwards(setup, reference):
    model, clean, corrupt, mask, answer, others = setup
    ld_clean, ld_corrupt, _, _ = reference
    assert abs(ld_clean.mean() - ld_corrupt.mean()) > 0.05
    ours = extraction_head_scores(model.cfg, model.params, clean, corrupt, mask, answer, others)
    expected = _extraction_loop(setup, reference)
    np.testing.assert_allclose(ours.clean, ld_clean, atol=1e-5)
    np.testing.assert_allclose(ours.corrupt, ld_corrupt, atol=1e-5)
    np.testing.assert_allclose(ours.scores, expected, atol=1e-4)
    assert np.abs(expected).max() > 0.05  # the senders matter


def test_last_layer_path_patch_equals_activation_patch(setup, reference):
    model, clean, corrupt, mask, answer, others = setup
    cfg = model.cfg
    ld_clean, ld_corrupt, clean_cache, _ = reference
    ours = extraction_head_scores(cfg, model.params, clean, corrupt, mask, answer, others)
    last = cfg.n_layers - 1
    for head in range(cfg.n_heads):
        head_mask = jnp.zeros((1, 1, cfg.n_heads, 1), bool).at[..., head, :].set(True)
        edits = one_layer_edit("attn_z", last, cfg.n_layers, head_mask, clean_cache["attn_z"][last])
        logits, _ = model.forward(corrupt, attention_mask=mask, edits=edits)
        ld = _ld(logits, answer, others)
        plain = ((ld - ld_corrupt.mean()) / (ld_clean.mean() - ld_corrupt.mean())).mean()
        assert abs(ours.scores[last, head] - plain) <= 1e-4


def test_enrichment_mlps_equal_loop_of_receiver_edits(setup, reference):
    model, clean, corrupt, mask, answer, others = setup
    receiver = 2
    ours = enrichment_mlp_scores(model.cfg, model.params, clean, corrupt, mask, answer, others, receiver)
    expected = _enrichment_loop(setup, reference, receiver)
    np.testing.assert_allclose(ours.scores, expected, atol=1e-4)
    assert np.all(ours.per_example[receiver:] == 0)
    assert np.abs(expected[:receiver]).max() > 0.01


# ---------------------------------------------------------------- selection and pipeline


def test_selection_rule_and_receiver():
    scores = np.array([0.05, 0.01, -0.04, 0.03, 0.015, 0.01])
    attr, layers = flu.select_layers(scores, threshold=0.02)
    np.testing.assert_allclose(attr, scores - 0.01)
    assert layers == (0, 2)
    heads = np.zeros((6, 4))
    heads[4, 1], heads[3, 2], heads[5, 0] = 0.9, -0.8, 0.7
    assert flu.receiver_layer(heads, top_k=3) == 3
    assert flu.receiver_layer(heads, top_k=1) == 4


def test_paper_layer_lists():
    assert flu.paper_flu_layers("gemma-7b", "sports") == (2, 3, 4, 5, 6, 7)
    assert flu.paper_flu_layers("gemma-2-9b", "sports") == (2, 3, 4, 5, 6)
    assert flu.paper_flu_layers("llama-3-8b", "sports") == (1, 2, 3, 4)
    assert flu.paper_flu_layers("gemma-7b", "counterfact_0_64") == (1, 3, 4, 6, 12)
    assert flu.paper_flu_layers("llama-3-8b", "counterfact_0_16") == (5, 6, 9, 13)
    with pytest.raises(jaxedit.JaxeditError, match="no paper FLU layers"):
        flu.paper_flu_layers("gemma-7b", "trivia")


def test_locate_runs_the_pipeline(setup, reference):
    """locate = extraction heads, the given receiver, enrichment MLPs and the selection rule, each against the
    Python loops above and the rule by hand."""
    model, clean, corrupt, mask, answer, others = setup
    with pytest.raises(jaxedit.JaxeditError, match="include layer 0"):  # 10 of the 12 tiny heads
        flu.locate(model.cfg, model.params, clean, corrupt, mask, answer, others)
    result = flu.locate(model.cfg, model.params, clean, corrupt, mask, answer, others, threshold=0.01, receiver=2)
    np.testing.assert_allclose(result.extraction.scores, _extraction_loop(setup, reference), atol=1e-4)
    assert result.receiver == 2
    enrichment = _enrichment_loop(setup, reference, 2)
    np.testing.assert_allclose(result.enrichment.scores, enrichment, atol=1e-4)
    attr = enrichment - enrichment[-1]  # the selection rule (§3.2): relative to the last layer's score
    np.testing.assert_allclose(result.attr, attr, atol=2e-4)
    assert np.abs(np.abs(attr) - 0.01).min() > 1e-3  # no score at the threshold: the selection is well defined
    assert result.layers == tuple(int(i) for i in np.flatnonzero(np.abs(attr) > 0.01))
    arrays = flu.score_arrays(result, model="tiny-gemma2")
    assert arrays["extraction_heads"].axes == ("layer", "head")
    assert arrays["enrichment_mlps"].meta["layers"] == list(result.layers)


def test_resid_at_gathers_each_rows_position(setup, reference):
    model, clean, _, mask, _, _ = setup
    index = np.array([7, 5, 3, 6])
    feats = resid_at(model.cfg, model.params, clean, mask, index, "resid_post", batch_size=3)
    expected = reference[2]["resid_post"][:, np.arange(4), index]
    np.testing.assert_allclose(feats, expected, atol=1e-5)
