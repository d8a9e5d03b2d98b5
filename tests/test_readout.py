"""The one readout (`jaxedit.readout`) agrees with full forwards; the fixed-shape batcher and cycling order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.data.batching import MIN_BUCKET, cycling_order, fixed_batches, padded_batches
from jaxedit.interventions import SiteEdit
from jaxedit.models import core
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import init_params
from jaxedit.readout import read, read_jit, resid_at

CFG = config_from_hf(dict(model_type="gemma2", vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=4, sliding_window=3,
                          max_position_embeddings=32, query_pre_attn_scalar=4, attn_logit_softcapping=5.0,
                          final_logit_softcapping=3.0))


@pytest.fixture(scope="module")
def batch():
    params = init_params(CFG, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 40, (3, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], jnp.int32)
    return params, tokens, mask


def test_reads_equal_full_forward(batch):
    params, tokens, mask = batch
    full, cache = core.forward(params, tokens, CFG, attention_mask=mask, capture=("resid_pre", "resid_post"))
    last = np.array([6, 3, 1])
    columns, ids = jnp.asarray([3, 9, 5]), jnp.asarray([[1, 2], [7, 7], [30, 0]])
    got = read_jit(params, CFG, tokens, mask, ("logits", "candidates", "log_probs", "top"), columns=columns, ids=ids)
    logits = np.asarray(full)[np.arange(3), last]  # [B,V]
    np.testing.assert_allclose(got["logits"][:, 0], logits, atol=1e-5)
    np.testing.assert_allclose(got["candidates"][:, 0], jax.nn.softmax(logits[:, [3, 9, 5]]), atol=1e-5)
    logp = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(got["log_probs"][:, 0], np.take_along_axis(logp, np.asarray(ids), 1), atol=1e-5)
    np.testing.assert_array_equal(got["top"][:, 0], logp.argmax(-1))
    positions = jnp.asarray([[0, 5], [3, 1], [1, 1]])
    got = read_jit(params, CFG, tokens, mask, ("resid_pre", "resid_post"), positions)
    for site in ("resid_pre", "resid_post"):
        expected = np.asarray(cache[site])[:, np.arange(3)[:, None], np.asarray(positions)]
        np.testing.assert_allclose(got[site], expected, atol=1e-5)
    final = read_jit(params, CFG, tokens, mask, ("final",), positions)["final"]  # [B,P,D], not unembedded
    np.testing.assert_allclose(final, np.asarray(cache["resid_post"])[-1, np.arange(3)[:, None], np.asarray(positions)],
                               atol=1e-5)
    assert set(read_jit(params, CFG, tokens, mask, ("final",), positions)) == {"final"}


def test_resid_at_batches_rows_like_one_batch(batch):
    params, tokens, mask = batch
    index = np.array([4, 2, 0])
    whole = resid_at(CFG, params, tokens, mask, index, "resid_post", batch_size=3)
    np.testing.assert_allclose(resid_at(CFG, params, tokens, mask, index, "resid_post", batch_size=2), whole,
                               atol=1e-6)
    assert whole.shape == (CFG.n_layers, 3, CFG.d_model)


def test_embed_hook_is_applied_per_adversary(batch):
    params, tokens, mask = batch
    shift = jnp.stack([jnp.zeros(CFG.d_model), jnp.full(CFG.d_model, 0.3)])  # [R=2,D]
    got = read_jit(params, CFG, tokens, mask, ("logits",), hook=lambda s, scale, x: x + scale * s,
                   hook_args=(shift, jnp.float32(1.0)))["logits"]
    plain = read(params, CFG, tokens, mask, ("logits",))["logits"]
    np.testing.assert_allclose(got[0], plain, atol=1e-6)
    edit = {"embed": SiteEdit(delta=0.3 * CFG.embed_scale)}
    shifted, _ = core.forward(params, tokens, CFG, attention_mask=mask, edits=edit,
                              logit_positions=core.last_positions(mask))
    np.testing.assert_allclose(got[1], shifted, atol=1e-5)
    assert not np.allclose(got[1], plain, atol=1e-3)


def test_fixed_batches_repeat_the_last_row():
    got = [(start, rows.tolist(), n) for start, rows, n in fixed_batches(5, 2)]
    assert got == [(0, [0, 1], 2), (2, [2, 3], 2), (4, [4, 4], 1)]
    (_, rows, n, ids, mask), = padded_batches([[5, 6, 7], [8]], pad_id=0, batch_size=3, padding_side="left")
    assert rows.tolist() == [0, 1, 1] and n == 2 and ids.shape == mask.shape == (3, MIN_BUCKET)
    assert ids[1, -1] == ids[2, -1] == 8 and mask[1].sum() == 1


def test_cycling_order_concatenates_seeded_shuffles():
    rng, again = np.random.default_rng(3), np.random.default_rng(3)
    order = cycling_order(rng.permutation, 4, 10)
    expected = np.concatenate([again.permutation(4) for _ in range(3)])[:10]
    np.testing.assert_array_equal(order, expected)
    assert sorted(order[:4]) == sorted(order[4:8]) == [0, 1, 2, 3]


def test_shared_prefix_forward_equals_the_full_rows():
    """`core.forward_shared_prefix`: logits and gradients of prefix + row equal the full forward of the
    concatenated rows, across the sliding window (3) of the local layers; right-padded rows."""
    params = init_params(CFG, jax.random.key(1))
    rng = np.random.default_rng(1)
    prefix = jnp.asarray(rng.integers(1, 40, 5), jnp.int32)
    rest = jnp.asarray(rng.integers(1, 40, (3, 4)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], jnp.int32)
    whole = jnp.concatenate([jnp.broadcast_to(prefix, (3, 5)), rest], axis=1)
    whole_mask = jnp.concatenate([jnp.ones((3, 5), jnp.int32), mask], axis=1)
    last = core.last_positions(mask)

    def shared(p, frozen_below=0):
        return read(p, CFG, rest, mask, ("logits",), prefix=prefix, frozen_below=frozen_below)["logits"]

    def full(p, frozen_below=0):
        return read(p, CFG, whole, whole_mask, ("logits",), frozen_below=frozen_below)["logits"]

    np.testing.assert_allclose(shared(params), full(params), atol=1e-5)
    final = read(params, CFG, rest, mask, ("final",), prefix=prefix)["final"]  # the residual the logits unembed
    np.testing.assert_allclose(core.unembed(CFG, params, final), full(params), atol=1e-5)
    assert np.asarray(last)[:, 0].tolist() == [3, 1, 0]
    loss = lambda p, f: (f(p) ** 2).sum()  # noqa: E731
    for frozen_below in (0, 1):  # 1: no gradient below layer 1 (the tied embedding still gets the unembedding's)
        g_shared = jax.grad(loss)(params, lambda p: shared(p, frozen_below))
        g_full = jax.grad(loss)(params, lambda p: full(p, frozen_below))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g_shared, g_full)
        assert np.abs(np.asarray(g_shared["layers"]["mlp"]["w_up"][1])).max() > 1e-3


def test_read_prompts_reads_shared_prefix_rows_like_whole_rows(batch):
    from types import SimpleNamespace

    from jaxedit.data.batching import shared_prefix_length
    from jaxedit.readout import read_prompts

    params, _, _ = batch
    rows = [[5, 6, 7, 8, 9], [5, 6, 7, 2], [5, 6, 7, 3, 3, 3, 1]]
    assert shared_prefix_length(rows) == 3
    assert shared_prefix_length([[5, 6], [5, 6, 7]]) == 1  # every row keeps a token of its own
    assert shared_prefix_length([[5, 6]]) == 0
    model = SimpleNamespace(params=params, cfg=CFG, tokenizer=SimpleNamespace(pad_token_id=0))
    got = read_prompts(model, rows, ("logits",), batch_size=2)["logits"][:, 0]
    for i, row in enumerate(rows):
        alone = core.forward(params, jnp.asarray([row]), CFG)[0][0, -1]
        np.testing.assert_allclose(got[i], alone, atol=1e-5)
