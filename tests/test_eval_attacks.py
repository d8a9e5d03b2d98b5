"""Sports evaluation metrics, latent probes, the relearning attack and one end-to-end experiment."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxedit
from jaxedit.attacks import relearn as relearn_mod
from jaxedit.attacks.relearn import RelearnSettings, all_linear_mask, split_forget
from jaxedit.data import sports
from jaxedit.data.sports import SportsFact
from jaxedit.edit.lora import TARGETS
from jaxedit.data.text import GeneralTextSettings
from jaxedit.edit.train import TrainSettings
from jaxedit.eval import latent
from jaxedit.eval.sports_eval import accuracies, evaluate_sports, format_metrics
from jaxedit.attacks.soft_prompt import SoftPromptSettings
from jaxedit.experiment import Settings, prepare, run_experiment
from jaxedit.localize.pipeline import LocalizeSettings
from jaxedit.tasks import DataSettings, EvalSettings
from jaxedit.localize.fact_lookup import subject_last_tokens
from jaxedit.readout import logits_after, resid_at
from jaxedit.tasks.sports import COLUMNS, SportsTask


@pytest.fixture(scope="module")
def smol():
    return jaxedit.load("smollm2-135m")


@pytest.fixture(scope="module")
def team():
    return sports.team_facts(sports.load_sports())


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_metrics_equal_hand_computation():
    logits = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5], [1.0, 1.0, 4.0, 0.0]]
    probs = np.array([_softmax(r) for r in logits])
    forget = [SportsFact("A", "football", "golf", "baseball"), SportsFact("B", "baseball", "golf", "basketball")]
    maintain = [SportsFact("C", "basketball", "golf", "football")]
    out = format_metrics("qa", probs[:2], probs[2:], forget, maintain)
    p = probs.tolist()
    assert out["qa/forget"] == pytest.approx((p[0][0] + p[1][1]) / 2)  # true: football, baseball
    assert out["qa/forget_argmax"] == 1.0
    assert out["qa/edit"] == pytest.approx((p[0][1] + p[1][2]) / 2)  # injected: baseball, basketball
    assert out["qa/edit_argmax"] == 0.0
    assert out["qa/maintain"] == pytest.approx(p[2][2]) and out["qa/maintain_argmax"] == 1.0
    assert accuracies(probs[:2], np.array([1, 1])) == pytest.approx(((p[0][1] + p[1][1]) / 2, 0.5))


def test_evaluate_sports_equals_softmax_of_candidate_logits(smol, team):
    forget, maintain = team[:3], team[3:5]
    got = evaluate_sports(smol, forget, maintain, formats=("qa", "mcq_fact"))
    for fmt in ("qa", "mcq_fact"):
        logits = logits_after(smol, [sports.prompt(f.athlete, fmt) for f in forget + maintain])
        ids = [smol.tokenizer.encode(a, add_special_tokens=False)[0] for a in sports.answers(fmt)]
        probs = [_softmax(row[ids].tolist()) for row in logits]
        true = [sports.SPORTS.index(f.sport) for f in forget + maintain]
        inject = [sports.SPORTS.index(f.inject_without_golf) for f in forget]
        assert got[f"{fmt}/forget"] == pytest.approx(np.mean([probs[i][true[i]] for i in range(3)]), abs=1e-4)
        assert got[f"{fmt}/edit"] == pytest.approx(np.mean([probs[i][inject[i]] for i in range(3)]), abs=1e-4)
        assert got[f"{fmt}/maintain"] == pytest.approx(np.mean([probs[i][true[i]] for i in (3, 4)]), abs=1e-4)
        assert got[f"{fmt}/maintain_argmax"] == np.mean([np.argmax(probs[i]) == true[i] for i in (3, 4)])


def test_probe_features_are_hidden_states_at_the_last_prompt_and_subject_tokens(smol, team):
    """§5.6 reads the last prompt token ('prompt', the paper's); 'subject' the subject's last token; left padding."""
    facts = [team[0], team[7]]
    prompts, subjects = [sports.prompt(f.athlete) for f in facts], [f.athlete for f in facts]
    got = latent.probe_features(smol, facts)  # both positions, one forward
    assert len({len(smol.tokenizer.encode(p)) for p in prompts}) == 2  # rows of different lengths: padding matters
    for i, (prompt, subject) in enumerate(zip(prompts, subjects)):  # one unpadded prompt at a time
        ids, offsets = smol.tokenizer.encode_with_offsets(prompt)
        start = prompt.index(subject)
        last = {"subject": max(j for j, (a, b) in enumerate(offsets) if a < start + len(subject) and b > start),
                "prompt": len(ids) - 1}
        tokens = jnp.asarray([ids])
        _, cache = smol.forward(tokens, attention_mask=jnp.ones_like(tokens), capture=("resid_pre",))
        for pos, x in got.items():
            assert x.shape == (smol.cfg.n_layers, 2, smol.cfg.d_model)
            np.testing.assert_allclose(x[:, i], np.asarray(cache["resid_pre"][:, 0, last[pos]]), atol=2e-4, rtol=1e-4)
            embed = np.asarray(smol.params["embed"]["tokens"][ids[last[pos]]]) * smol.cfg.embed_scale
            np.testing.assert_allclose(x[0, i], embed, atol=1e-6)  # hidden_states[0] = the embeddings
    subject_tokens = subject_last_tokens(smol.tokenizer, prompts, subjects)
    np.testing.assert_array_equal(got["subject"], resid_at(smol.cfg, smol.params, *subject_tokens))


def test_probes_fit_on_maintain_and_score_forget():
    rng = np.random.default_rng(0)
    n, m, d = 60, 9, 8
    y = np.arange(n) % 3
    true = np.arange(m) % 3
    inject = (true + 1) % 3

    def feats(labels):
        noise = rng.normal(size=(len(labels), d))
        signal = noise.copy()
        signal[:, :3] += 6 * np.eye(3)[labels]
        return np.stack([noise, signal])  # layer 0: no information; layer 1: the label

    res = latent.probe_edit(feats(y), y, feats(true), true, inject, steps=50)
    assert res.maintain_test[1] == 1.0 and res.forget_ground_truth[1] == 1.0 and res.forget_edit[1] == 0.0
    edited = feats(inject)  # the edit moved the representation to the injected sport
    res = latent.probe_edit(feats(y), y, edited, true, inject, steps=50)
    assert res.forget_ground_truth[1] == 0.0 and res.forget_edit[1] == 1.0


def test_relearning_trains_true_answers_and_only_adapters(smol, team, monkeypatch):
    forget, maintain = team[:4], team[4:8]
    seen = []
    real_step = relearn_mod.train_step

    def spy(trainable, frozen, opt_state, batch, *args, **kwargs):
        seen.append((jax.tree.map(np.asarray, batch), frozen))
        out = real_step(trainable, frozen, opt_state, batch, *args, **kwargs)
        seen[-1] += (jax.tree.map(np.array, out[0]),)
        return out

    monkeypatch.setattr(relearn_mod, "train_step", spy)
    params = smol.params
    before = jax.tree.map(np.array, params)
    task = SportsTask(team)
    train_half, held_out = split_forget(forget)
    settings = RelearnSettings(lora_rank=2, lora_alpha=4.0, steps=2, eval_at=(0, 2), accumulate=1)
    out = relearn_mod.relearn(smol, params, task.relearn_sets(smol.tokenizer, train_half, maintain[:2]),
                              lambda p: evaluate_sports(smol, held_out, maintain[2:], params=p, formats=("fact",)),
                              settings)
    assert set(out) >= {"relearn/0/fact/forget", "relearn/2/fact/forget", "relearn/2/fact/maintain"}
    sport_id = {s: smol.tokenizer.encode(f" {s}", add_special_tokens=False)[0] for s in sports.SPORTS}
    allowed_true = {sport_id[f.sport] for f in train_half}
    inject_ids = {sport_id[f.inject_without_golf] for f in train_half}
    for batch, frozen, adapters in seen:
        assert set(batch["forget"]["target"].tolist()) <= allowed_true  # the TRUE sports
        assert not set(batch["forget"]["target"].tolist()) & (inject_ids - allowed_true)
        assert frozen is params  # the base (edited) params are only read
        assert set(adapters) <= set(TARGETS)
        assert all(set(ab) == {"a", "b"} for ab in adapters.values())
    assert any(np.abs(ab["b"]).max() > 0 for ab in seen[-1][2].values())  # the adapters did train
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))


def test_full_finetuning_mask_is_all_linear_weights(smol):
    mask = all_linear_mask(smol.cfg)
    for name in ("wq", "wk", "wv", "wo"):
        assert np.all(mask["layers"]["attn"][name])
    for name in ("w_gate", "w_up", "w_down"):
        assert np.all(mask["layers"]["mlp"][name])
    assert not np.any(mask["embed"]["tokens"])


def test_run_experiment_end_to_end(tiny_llama_dir, team):
    """Every stage on a 2-layer random Llama with SmolLM2's tokenizer (the shapes and keys, not the numbers, matter)."""
    smol = jaxedit.load(str(tiny_llama_dir))
    task = SportsTask(team[:9])  # 4 forget, 4 maintain train, 1 maintain test (the filter keeps all at threshold 0)
    settings = Settings(data=DataSettings(n_forget=4, known_threshold=0.0), localize=LocalizeSettings(flu_layers=(0, 1)),
                        train=TrainSettings(lr=1e-4, accumulate=1, steps=2), general_text=GeneralTextSettings(n=0),
                        eval=EvalSettings(probe_steps=10),
                        relearn=RelearnSettings(lora_rank=2, steps=2, eval_at=(0, 2), accumulate=1),
                        soft_prompt=SoftPromptSettings(kind="prefix", n_vectors=2, steps=2, batch_size=2, restarts=2))
    split = task.split(smol, settings.data, seed=0)
    prepared = prepare(smol, task, split, settings, ("manual_interp",))
    assert prepared.scores == [{"flu_layers": (0, 1)}]  # given FLU layers: no fact lookup, no AP/CT for this one
    out = run_experiment(smol, task, prepared, "manual_interp", settings)
    keys = set(COLUMNS) | {"probe_gt_last", "probe_edit_last", "probe_subject_gt_last", "probe_subject_edit_last",
                           "relearn_forget", "relearn_maintain", "n_params",
                           "selection_score", "time/localize", "time/edit", "time/eval_after", "time/probe",
                           "time/attacks", "time/total", "softprompt_forget", "softprompt_edit",
                           "softprompt_maintain"}
    assert keys <= set(out)
    assert out["n_forget"] == 4 and out["n_maintain_train"] == 4 and out["n_maintain_test"] == 1
    assert out["forget"] == out["after/fact/forget"] and out["edit"] == out["after/qa/edit"]
    assert out["selection_score"] == pytest.approx(1 - out["forget"] + out["maintain"] + out["edit"])
    assert len(out["probe_ground_truth"]) == len(out["probe_subject_ground_truth"]) == smol.cfg.n_layers
    original = latent.latent_knowledge(smol, split.forget, split.maintain_train, params=smol.params, seed=0, steps=10)
    assert out["before/probe_ground_truth"] == original["prompt"].forget_ground_truth.tolist()  # the unedited model's
    assert all(np.isfinite(out[k]) for k in keys if k != "n_params")
