"""Fidelity to the paper (issue 13): §5.6 probe position, unlearning's target, held-out general text, relearn steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml

import jaxedit
from jaxedit import experiment
from jaxedit.attacks.relearn import RelearnSettings
from jaxedit.attacks.soft_prompt import SoftPromptSettings
from jaxedit.data import sports, text
from jaxedit.data.text import GeneralTextSettings
from jaxedit.edit import train as train_mod
from jaxedit.edit.train import TrainSettings
from jaxedit.errors import JaxeditError
from jaxedit.eval import latent
from jaxedit.localize import components as C
from jaxedit.sweep.config import grid_points, load_config, with_values
from jaxedit.tasks import DataSettings, EvalSettings
from jaxedit.tasks.sports import SportsTask


@pytest.fixture(scope="module")
def team():
    return sports.team_facts(sports.load_sports())


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return jaxedit.load(str(tiny_llama_dir))


def _hf_hidden_at(hf, rows: list[list[int]], pick) -> np.ndarray:
    """HF hidden_states[0..L-1] [L,N,D] of right-padded token rows, at position pick(i, row) of row i."""
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    with torch.no_grad():
        states = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    at = [pick(i, r) for i, r in enumerate(rows)]
    return np.stack([s[torch.arange(len(rows)), at].numpy() for s in states[:-1]])


def _subject_last(tokenizer, prompt: str, subject: str) -> int:
    """Index of the last token overlapping `subject` in the unpadded prompt (by character offsets)."""
    _, offsets = tokenizer.encode_with_offsets(prompt)
    start = prompt.index(subject)
    return max(j for j, (a, b) in enumerate(offsets) if a < start + len(subject) and b > start)


def test_probe_reads_last_prompt_token_like_hf(tiny, tiny_llama_dir, team, monkeypatch):
    """§5.6: the probe rows' features are HF's hidden states at each prompt's last real token (subject: own keys)."""
    task = SportsTask(team[:12])
    split = task.split(tiny, DataSettings(n_forget=4, known_threshold=0.0), seed=0)
    facts = split.maintain_train + split.forget
    rows = [tiny.tokenizer.encode(sports.prompt(f.athlete)) for f in facts]
    assert len({len(r) for r in rows}) > 1  # the left padding differs between rows
    seen = {}
    real = latent.probe_features

    def spy(model, facts, params=None, positions=tuple(latent.POSITIONS)):
        seen.update(real(model, facts, params, positions))
        return {p: seen[p] for p in positions}

    monkeypatch.setattr(latent, "probe_features", spy)
    row = task.latent(tiny, split, tiny.params, steps=10, seed=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    last = _hf_hidden_at(hf, rows, lambda i, r: len(r) - 1)
    subject = _hf_hidden_at(hf, rows, lambda i, r: _subject_last(tiny.tokenizer, sports.prompt(facts[i].athlete),
                                                                 facts[i].athlete))
    assert seen["prompt"].shape == (tiny.cfg.n_layers, len(facts), tiny.cfg.d_model)
    np.testing.assert_allclose(seen["prompt"], last, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(seen["subject"], subject, atol=1e-4, rtol=1e-4)
    assert np.abs(last - subject)[1:].max() > 1e-2  # the two positions are told apart
    n = len(split.maintain_train)
    label = lambda rows, field: [sports.TEAM_SPORTS.index(getattr(f, field)) for f in rows]  # noqa: E731
    for position, prefix in (("prompt", "probe"), ("subject", "probe_subject")):
        x = seen[position]
        want = latent.probe_edit(x[:, :n], label(split.maintain_train, "sport"), x[:, n:], label(split.forget, "sport"),
                                 label(split.forget, "inject_without_golf"), seed=0, steps=10)
        assert row[f"{prefix}_ground_truth"] == want.forget_ground_truth.tolist()  # by layer, for the plot
        assert row[f"{prefix}_edit"] == want.forget_edit.tolist()
        assert row[f"{prefix}_maintain_test"] == want.maintain_test.tolist()
        assert row[f"{prefix}_gt_last"] == want.forget_ground_truth[-1]
        assert row[f"{prefix}_edit_last"] == want.forget_edit[-1]
        assert len(row[f"{prefix}_ground_truth"]) == tiny.cfg.n_layers


def _true_probs(model, params, facts) -> np.ndarray:
    """[N] full-vocabulary P(first token of the true sport) after each prompt: one plain right-padded forward,
    read at each row's last real token."""
    rows = [model.tokenizer.encode(sports.prompt(f.athlete)) for f in facts]
    t = max(len(r) for r in rows)
    ids = jnp.asarray([r + [0] * (t - len(r)) for r in rows])
    mask = jnp.asarray([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    logits, _ = model.forward(ids, params=params, attention_mask=mask)
    last = np.asarray(logits, np.float64)[np.arange(len(rows)), [len(r) - 1 for r in rows]]  # [N,V]
    p = np.exp(last - last.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p[np.arange(len(rows)), [model.tokenizer.encode(f" {f.sport}", add_special_tokens=False)[0] for f in facts]]


def test_unlearning_lowers_the_true_answer_through_the_task_batches(team, monkeypatch):
    """train.unlearn through the sweep's own batches (task.train_sets → experiment.edit): log(1 − p(TRUE sport))."""
    smol = jaxedit.load("smollm2-135m")
    task = SportsTask(team)
    split = task.split(smol, DataSettings(n_forget=4, known_threshold=0.0, max_maintain=10), seed=0)
    by_prompt = {tuple(smol.tokenizer.encode(sports.prompt(f.athlete))): f for f in split.forget}
    true_id = lambda f: smol.tokenizer.encode(f" {f.sport}", add_special_tokens=False)[0]  # noqa: E731
    before = _true_probs(smol, smol.params, split.forget)
    assert np.all(np.log(before) > -5)  # above the threshold: every row has a gradient
    seen = []
    real = train_mod.train_step

    def spy(trainable, frozen, opt_state, batch, *args, **kwargs):
        seen.append(jax.tree.map(np.asarray, batch))
        out = real(trainable, frozen, opt_state, batch, *args, **kwargs)
        seen[-1]["metrics"] = jax.tree.map(float, out[2])
        return out

    monkeypatch.setattr(train_mod, "train_step", spy)
    settings = experiment.Settings(train=TrainSettings(lr=3e-4, unlearn=True, maintain_coef=0.0, lm_coef=0.0, steps=3,
                                                       batch_size=4, accumulate=1, checkpoint_every=0))
    prepared = experiment.Prepared(split, [{}], {}, None)
    mask = C.trainable_mask(C.mlp_layers(smol.cfg, [20, 24]), smol.cfg)
    edited = experiment.edit(smol, task, prepared, [mask], settings)
    assert len(seen) == 3
    for batch in seen:
        got = batch["forget_true"]
        facts = [by_prompt[_whole_row(got, r, m)] for r, m in zip(got["tokens"], got["mask"])]
        assert got["target"].tolist() == [true_id(f) for f in facts]  # the TRUE sports' tokens
    first = seen[0]["forget_true"]
    p = _true_probs(smol, smol.params, [by_prompt[_whole_row(first, r, m)]
                                        for r, m in zip(first["tokens"], first["mask"])])
    assert seen[0]["metrics"]["forget"] == pytest.approx(-np.log1p(-p).mean(), rel=1e-3)  # hand log(1 − p), step 0
    after = _true_probs(smol, edited, split.forget)
    assert np.all(after < before), (before, after)


def _whole_row(batch: dict, row, mask) -> tuple:
    """A prompt's tokens from a batch row: the batch's shared 'prefix' [S] (if any), then the row's real tokens."""
    return tuple(batch.get("prefix", np.zeros(0, int)).tolist() + row[mask == 1].tolist())


def _locate(body: list[int], streams: list[list[int]]) -> tuple[int, int]:
    """(document, offset) of the one place the token list `body` occurs in the documents' token streams."""
    hits = [(d, i) for d, ids in enumerate(streams) for i in range(len(ids) - len(body) + 1)
            if ids[i:i + len(body)] == body]
    assert len(hits) == 1, hits
    return hits[0]


def test_general_text_evaluation_windows_are_disjoint_from_training(tiny, tmp_path):
    """Corpus windows: the held-out ones share no token offset of any document with the training ones."""
    docs = [" ".join(f"item{d}n{j}" for j in range(12 + 5 * d)) for d in range(6)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs))
    tok = tiny.tokenizer
    streams = [tok.encode(d, add_special_tokens=False) for d in docs]
    for seed in (0, 1):
        got = text.general_text(tiny, GeneralTextSettings(corpus=str(path), n=6, n_eval=5, ctx=12), seed)
        spans = {}
        for part, (tokens, mask) in (("train", got.train), ("held_out", got.held_out)):
            assert tokens.shape == mask.shape == ({"train": 6, "held_out": 5}[part], 12)
            assert np.all(tokens[:, 0] == tok.bos_token_id)
            bodies = [row[1:m.sum()].tolist() for row, m in zip(tokens, mask)]
            spans[part] = [(d, i, i + len(b)) for b, (d, i) in ((b, _locate(b, streams)) for b in bodies)]
        for d, a, b in spans["held_out"]:
            assert all(d2 != d or b2 <= a or b <= a2 for d2, a2, b2 in spans["train"])
        assert {d for d, _, _ in spans["held_out"]} & {d for d, _, _ in spans["train"]}  # same document, other tokens


def test_general_text_samples_split_into_disjoint_generations(tiny):
    """Model samples: training rows are samples 0..n-1 of the seed, held-out rows the next n_eval ones."""
    got = text.general_text(tiny, GeneralTextSettings(n=3, n_eval=2, ctx=10), seed=4)
    tokens, mask = text.sample_text(tiny, 5, ctx=10, seed=4)
    np.testing.assert_array_equal(np.concatenate([got.train[0], got.held_out[0]]), tokens)
    np.testing.assert_array_equal(np.concatenate([got.train[1], got.held_out[1]]), mask)
    assert not {tuple(r) for r in got.held_out[0]} & {tuple(r) for r in got.train[0]}
    assert text.general_text(tiny, GeneralTextSettings(n=0), seed=4) is None


def test_side_effects_score_held_out_windows_and_the_lm_term_trains_on_the_others(tiny, team, tmp_path, monkeypatch):
    """Through the experiment: every LM micro-batch row is a training window; the metrics see the held-out ones."""
    from jaxedit.eval import side_effects

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(" ".join(f"doc{d}w{j}" for j in range(30)) for d in range(3)))
    task = SportsTask(team[:9])
    split = task.split(tiny, DataSettings(n_forget=4, known_threshold=0.0), seed=0)
    settings = experiment.Settings(train=TrainSettings(steps=3, batch_size=2, accumulate=2),
                                   general_text=GeneralTextSettings(corpus=str(path), n=4, n_eval=3, ctx=12))
    general = text.general_text(tiny, settings.general_text, seed=0)
    batches = experiment.edit_batches(tiny, task, split.forget, experiment.Prepared(split, [{}], {}, general), settings, 0)
    train_rows = {tuple(r) for r in general.train[0]}
    held_rows = {tuple(r) for r in general.held_out[0]}
    assert not train_rows & held_rows
    used = {tuple(r) for i in range(6) for r in np.asarray(batches(i)["lm"]["tokens"])}
    assert used == train_rows
    scored = []
    monkeypatch.setattr(side_effects, "general_text_metrics",
                        lambda model, tokens, mask, **kw: scored.append((tokens, mask)) or {"ce": 0.0})
    experiment.side_effects(tiny, tiny.params, general, EvalSettings(), "before")
    np.testing.assert_array_equal(scored[0][0], general.held_out[0])
    np.testing.assert_array_equal(scored[0][1], general.held_out[1])


def _write(tmp_path, config: dict) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_relearn_eval_at_is_validated_and_follows_steps(tmp_path):
    """eval_at past relearn.steps (or without it) fails at load; unset, it follows steps and ends at steps."""
    path = _write(tmp_path, {"relearn": {"steps": 20}})
    assert load_config(path).relearn.eval_at == (0, 10, 20)
    assert load_config(path, ["relearn.steps=8"]).relearn.eval_at == (0, 4, 8)
    assert RelearnSettings().eval_at == (0, 10, 20) and RelearnSettings(steps=1).eval_at == (0, 1)
    for override in ("relearn.eval_at=[0,10,30]", "relearn.eval_at=[0,10]", "relearn.eval_at=[-1,20]"):
        with pytest.raises(JaxeditError, match="relearn.eval_at") as caught:
            load_config(path, [override])
        assert "\n" not in str(caught.value)
    assert load_config(path, ["relearn.enabled=false", "relearn.eval_at=[0,30]"]).relearn.eval_at == (0, 30)
    gridded = load_config(_write(tmp_path, {"grid": {"relearn.steps": [4, 6]}}))
    for point in grid_points(gridded):
        r = with_values(gridded, dict(point)).relearn
        assert r.eval_at[-1] == r.steps and r.eval_at == (0, r.steps // 2, r.steps)
    with pytest.raises(JaxeditError, match="relearn.eval_at"):
        load_config(_write(tmp_path, {"relearn": {"eval_at": [0, 20]}, "grid": {"relearn.steps": [20, 10]}}))


def test_relearning_reports_the_final_step(tiny, team):
    """With the default eval_at, the experiment's relearning result is the measurement after all relearn.steps."""
    task = SportsTask(team[:10])
    split = task.split(tiny, DataSettings(n_forget=4, known_threshold=0.0), seed=0)
    settings = experiment.Settings(relearn=RelearnSettings(lora_rank=2, steps=4, batch_size=2, accumulate=1),
                                   soft_prompt=SoftPromptSettings(enabled=False))
    out = experiment.attacks(tiny, task, split, tiny.params, settings)
    assert {k.split("/")[1] for k in out if k.startswith("relearn/")} == {"0", "2", "4"}
    assert out["relearn_forget"] == out["relearn/4/fact/forget"]
    assert out["relearn_maintain"] == out["relearn/4/fact/maintain"]
    assert dataclasses.replace(settings.relearn, steps=6).eval_at == (0, 3, 6)
