"""Soft-prompt attacks: torch MHA parity, prefix = inserted tokens, frozen model, norm bound, loss goes down."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import jaxedit
from jaxedit.attacks import soft_prompt as sp
from jaxedit.attacks.soft_prompt import SoftPromptSettings
from tiny_models import VOCAB, save_hf_model

PROMPTS = ["w10 w11 w12 w13 w14", "w20 w21", "w30 w31 w32 w33 w34 w35 w36 w37 w38", "w40 w41 w42"]
LABELS = ["w50 w51", "w52", "w53", "w54 w55 w56"]


def _save_word_tokenizer(path):
    """A word-level tokenizer over 'w4'..'w95' that prepends <bos> (id 1); pad 0, eos 2."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                            "pad_token": "<pad>"}))


@pytest.fixture(scope="module", params=["gemma3", "gpt2"])
def pair(request, tmp_path_factory):
    """(HF torch model, jaxedit model with a word tokenizer), same weights."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, path)
    _save_word_tokenizer(path)
    return hf, jaxedit.load(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny GPT-2 (the family whose backward pass compiles fastest) for the training tests."""
    path = tmp_path_factory.mktemp("gpt2_sp")
    save_hf_model("gpt2", path, seed=1)
    _save_word_tokenizer(path)
    return jaxedit.load(path)


def _first(adversary):
    return jax.tree.map(lambda a: a[0], adversary)


def _torch_delta(adv, x):
    """torch: nn.MultiheadAttention(D, 1, bias=False)(query_proj(x), keys, values) with `adv` copied in."""
    d = x.shape[-1]
    t = lambda a: torch.tensor(np.asarray(a).T.copy())  # noqa: E731  x @ W  <->  torch weight W.T
    query_proj = torch.nn.Linear(d, d, bias=False)
    mha = torch.nn.MultiheadAttention(d, 1, bias=False, batch_first=True)
    with torch.no_grad():
        query_proj.weight.copy_(t(adv["w_query"]))
        mha.in_proj_weight.copy_(torch.cat([t(adv["w_q"]), t(adv["w_k"]), t(adv["w_v"])]))
        mha.out_proj.weight.copy_(t(adv["w_o"]))
        x = torch.tensor(np.asarray(x))
        keys = torch.tensor(np.asarray(adv["keys"]))[None].expand(x.shape[0], -1, -1)
        values = torch.tensor(np.asarray(adv["values"]))[None].expand(x.shape[0], -1, -1)
        out, _ = mha(query_proj(x), keys, values, need_weights=False)
    return out.numpy()


def _scaled(adversary, factor):
    """Larger keys/queries so the attention weights are far from uniform."""
    return {k: v * factor if k in ("keys", "w_query") else v for k, v in adversary.items()}


def test_attention_delta_equals_torch_multihead_attention():
    adv = _scaled(_first(sp.init_adversary(32, SoftPromptSettings(restarts=1))), 4.0)
    x = np.random.default_rng(0).normal(size=(3, 7, 32)).astype(np.float32)
    ours = np.asarray(sp.attention_delta(adv, jnp.asarray(x)))
    ref = _torch_delta(adv, x)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_attention_attack_equals_hf_with_perturbed_input_embeddings(pair):
    """The whole attacked forward: HF fed embedding rows + torch's MHA perturbation (then Gemma's scale)."""
    hf, model = pair
    settings = SoftPromptSettings(restarts=2)
    adversary = jax.tree.map(lambda a: a * 3.0, sp.init_adversary(model.cfg.d_model, settings))
    got = sp.attacked_last_logits(model, None, adversary, PROMPTS, batch_size=3)
    assert got.shape == (2, len(PROMPTS), VOCAB)
    scale = model.cfg.embed_scale
    for r in range(2):
        adv = jax.tree.map(lambda a: a[r], adversary)
        for i, prompt in enumerate(PROMPTS):
            ids = model.tokenizer.encode(prompt)
            raw = np.asarray(model.params["embed"]["tokens"])[ids][None]
            embeds = torch.tensor((raw + _torch_delta(adv, raw)) * np.float32(scale))
            with torch.no_grad():
                ref = hf(inputs_embeds=embeds, position_ids=torch.arange(len(ids))[None]).logits[0, -1].numpy()
            np.testing.assert_allclose(got[r, i], ref, atol=2e-4, rtol=1e-4)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # restarts are different adversaries


def _plain_logits(model, texts):
    """Logits [N,T,V] of the unattacked model on texts right-padded to 16 tokens (one compile)."""
    ids, mask = model.tokenizer(texts, length=16)
    logits, _ = model.forward(ids, attention_mask=mask)
    return np.asarray(logits, np.float64), ids, mask.sum(1)


INSERTED = [7, 8, 9]
WORDS = " ".join(f"w{i}" for i in INSERTED)


def _token_prefix(model):
    """A prefix adversary (R = 1) whose vectors are the embedding rows of INSERTED."""
    return {"vectors": model.params["embed"]["tokens"][jnp.asarray(INSERTED)][None]}


@pytest.mark.parametrize("side", ["right", "left"])
def test_prefix_of_token_embeddings_equals_inserted_tokens(pair, side):
    _, model = pair
    got = sp.attacked_last_logits(model, None, _token_prefix(model), PROMPTS, batch_size=3, padding_side=side)[0]
    expected, ids, lengths = _plain_logits(model, [f"{WORDS} {p}" for p in PROMPTS])
    assert np.all(ids[:, :4] == [1] + INSERTED)  # BOS first, then the inserted tokens
    np.testing.assert_allclose(got, expected[np.arange(len(PROMPTS)), lengths - 1], atol=2e-5, rtol=1e-5)


def test_label_loss_and_probabilities_equal_hand_computation(pair):
    """attack_loss = mean CE of the label tokens appended after prompt (+ prefix); probs = softmaxes."""
    _, model = pair
    adversary = _token_prefix(model)
    logits, ids, lengths = _plain_logits(model, [f"{WORDS} {p} {l}" for p, l in zip(PROMPTS, LABELS)])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = []
    for i, label in enumerate(LABELS):
        n_label = len(label.split())
        first = lengths[i] - n_label  # position of the first label token
        nll += [-logp[i, first - 1 + j, ids[i, first + j]] for j in range(n_label)]
    loss = sp.attack_loss(model, None, adversary, PROMPTS, LABELS, batch_size=3)
    assert loss.shape == (1,)
    assert loss[0] == pytest.approx(np.mean(nll), rel=1e-5)

    last = sp.attacked_last_logits(model, None, adversary, PROMPTS, batch_size=3)[0].astype(np.float64)
    cand = sp.attacked_candidate_probs(model, None, adversary, PROMPTS, ["w60", "w61 w62", "w63"], batch_size=3)[0]
    expected = np.exp(last[:, [60, 61, 63]] - last[:, [60, 61, 63]].max(1, keepdims=True))
    np.testing.assert_allclose(cand, expected / expected.sum(1, keepdims=True), atol=1e-6)
    token_ids = [60, 70, 80, 90]
    full = np.exp(last - last.max(1, keepdims=True))
    full /= full.sum(1, keepdims=True)
    probs = sp.attacked_token_probs(model, None, adversary, PROMPTS, token_ids, batch_size=3)[0]
    np.testing.assert_allclose(probs, full[np.arange(4), token_ids], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kind", ["attention", "prefix"])
def test_training_lowers_loss_keeps_model_frozen_and_norms_bounded(small, kind):
    settings = SoftPromptSettings(kind=kind, n_vectors=4, eps=2.0, lr=0.1, steps=12, batch_size=4, restarts=2)
    before = jax.tree.map(np.array, small.params)
    untrained = sp.init_adversary(small.cfg.d_model, settings)
    trained = sp.train_adversary(small, small.params, PROMPTS, LABELS, settings)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, small.params))
    for name in sp.NORM_BOUNDED:
        if name in trained:
            norms = np.linalg.norm(np.asarray(trained[name]), axis=-1)
            assert norms.max() <= settings.eps * (1 + 1e-5)
            assert norms.max() > 0.99 * settings.eps  # the bound was reached: the projection mattered
            assert np.linalg.norm(np.asarray(untrained[name]), axis=-1).max() < 0.95 * settings.eps
    loss_before = sp.attack_loss(small, None, untrained, PROMPTS, LABELS)
    loss_after = sp.attack_loss(small, None, trained, PROMPTS, LABELS)
    assert np.all(loss_after < loss_before - 0.5), (loss_before, loss_after)
    first = next(iter(trained.values()))
    assert not np.allclose(first[0], first[1])  # independent restarts
    compiled = sp._train_step._cache_size()
    other = dataclasses.replace(settings, lr=0.01, steps=2)
    sp.train_adversary(small, None, PROMPTS[::-1], LABELS[::-1], other, seed=3)
    assert sp._train_step._cache_size() == compiled  # another seed, lr or step count: no retrace


def test_initialization_matches_torch_modules():
    """Each leaf's range and spread equal those of the torch modules' own initialization."""
    d, m = 64, 15
    adv = _first(sp.init_adversary(d, SoftPromptSettings(restarts=1, eps=100.0)))
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(d, 1, bias=False)
    reference = {"keys": torch.nn.init.kaiming_uniform_(torch.empty(m, d)),
                 "w_query": torch.nn.Linear(d, d, bias=False).weight, "w_q": mha.in_proj_weight[:d],
                 "w_o": mha.out_proj.weight}
    for name, ref in reference.items():
        ours, ref = np.abs(np.asarray(adv[name])), np.abs(ref.detach().numpy())
        assert ours.shape == ref.shape
        assert ours.max() == pytest.approx(ref.max(), rel=0.05), name
        assert ours.std() == pytest.approx(ref.std(), rel=0.1), name


def test_bad_input_fails_with_one_line(small):
    with pytest.raises(jaxedit.JaxeditError, match="kind"):
        SoftPromptSettings(kind="suffix")
    with pytest.raises(jaxedit.JaxeditError, match="one label per prompt"):
        sp.train_adversary(small, None, PROMPTS, LABELS[:2], SoftPromptSettings(steps=1, restarts=1))
    adversary = sp.init_adversary(small.cfg.d_model, SoftPromptSettings(restarts=1))
    with pytest.raises(jaxedit.JaxeditError, match="one id per prompt"):
        sp.attacked_token_probs(small, None, adversary, PROMPTS, [5, 6])
