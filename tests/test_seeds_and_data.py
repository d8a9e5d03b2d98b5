"""Which facts a seed picks (forget set, maintain split, relearning halves), the paper's CSV order,
the whole-sport attack's halves (§5.8), `localize.flu_layers: paper` (§3.2) and the paper's CT noise (§3.4)."""

import csv
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import jaxedit
from jaxedit import experiment
from jaxedit.data import counterfact as cf
from jaxedit.data import sports
from jaxedit.errors import JaxeditError
from jaxedit.localize import components, pipeline
from jaxedit.localize.corruptions import PromptPairs
from jaxedit.sweep.config import load_config
from jaxedit.sweep.plan import model_config
from jaxedit.tasks import make_task
from jaxedit.tasks.counterfact import CounterFactTask
from jaxedit.tasks.sports import SportsTask
from tiny_models import padded_batch, save_hf_model

PAPER_HEADER = ["", "athlete", "sport", "log_prob_one_shot", "num_athlete_tokens", "sport_index", "sport_token",
                "prompt", "inject_sport_with_golf", "inject_sport_without_golf"]  # the paper's sports.csv (§1.1)


def _paper_csv(path: Path, n: int = 40) -> list[str]:
    """A hand-made CSV in the paper's schema; returns its athletes in file order."""
    names = [f"Player{chr(65 + i // 26)}{chr(65 + i % 26)} Smith" for i in range(n)]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PAPER_HEADER)
        for i, name in enumerate(names):
            sport = sports.TEAM_SPORTS[i % 3]
            inject = sports.TEAM_SPORTS[(i + 1) % 3]
            writer.writerow([i, name, sport, -0.3, 3, i % 3, 1000 + i % 3, sports.fact_prompt(name), "golf", inject])
    return names


def _stub_probs(monkeypatch, facts: list, known=frozenset()) -> None:
    """The model `SportsTask._known` reads: P(true sport) 0.9 for athletes in `known`, 0.01 for the others."""
    by_name = {f.athlete: f for f in facts}

    def probs(model, prompts, answers):
        out = np.full((len(prompts), 4), 0.03)
        for row, prompt in zip(out, prompts):
            athlete = prompt.rsplit("Fact: ", 1)[1].removesuffix(" plays the sport of")
            row[sports.SPORTS.index(by_name[athlete].sport)] = 0.9 if athlete in known else 0.01
        return out

    monkeypatch.setattr("jaxedit.tasks.sports.candidate_probs", probs)


def _split(cfg, monkeypatch, known=frozenset(), seed=0):
    task = make_task(cfg.task, cfg.data, cfg.eval)
    _stub_probs(monkeypatch, task.facts, known)
    return task.split(None, cfg.data, seed=seed)


def _names(facts) -> list[str]:
    return [f.athlete for f in facts]


def test_paper_csv_takes_its_first_16_rows_in_order_unfiltered(tmp_path, monkeypatch):
    names = _paper_csv(tmp_path / "sports.csv")
    cfg = load_config(None, [f"data.path={tmp_path / 'sports.csv'}", "data.known_threshold=0", "data.max_maintain=null"])
    for seed in (0, 1, 2):  # the model knows none of them (P = 0.01): threshold 0 keeps every row
        split = _split(cfg, monkeypatch, seed=seed)
        assert _names(split.forget) == _names(split.forget_test) == names[:16]
        k = int(0.8 * 24)  # §1.1: the other rows, first 80% / last 20%, in file order
        assert _names(split.maintain_train) == names[16:16 + k]
        assert _names(split.maintain_test) == names[16 + k:]
        assert [_names(h) for h in split.relearn_halves()] == [names[:8], names[8:16]]


def test_seed_draws_the_facts_from_the_known_ones(monkeypatch):
    cfg = load_config(None, ["data.max_maintain=40"])  # the built-in facts: order 'seeded'
    team = sports.team_facts(sports.load_sports())
    known = {f.athlete for i, f in enumerate(team) if i % 3 != 1}
    forgets = []
    for seed in (0, 1, 2):
        split = _split(cfg, monkeypatch, known, seed=seed)
        # reference: the team rows permuted by the seed, the known ones kept, then split in order
        perm = np.random.default_rng(seed).permutation(len(team))
        rows = [team[i].athlete for i in perm if team[i].athlete in known]
        assert _names(split.forget) == rows[:16]
        assert _names(split.maintain_train) == rows[16:48] and _names(split.maintain_test) == rows[48:56]
        assert [_names(h) for h in split.relearn_halves()] == [rows[:8], rows[8:16]]
        assert set(_names(split.forget)) <= known
        assert _names(_split(cfg, monkeypatch, known, seed=seed).forget) == rows[:16]  # deterministic
        forgets.append(set(_names(split.forget)))
    assert forgets[0] != forgets[1] != forgets[2] != forgets[0]


def test_data_order_key_overrides_the_default(tmp_path, monkeypatch):
    team = sports.team_facts(sports.load_sports())
    cfg = load_config(None, ["data.order=file"])
    assert _names(_split(cfg, monkeypatch, {f.athlete for f in team}, seed=3).forget) == _names(team[:16])
    names = _paper_csv(tmp_path / "sports.csv")
    cfg = load_config(None, [f"data.path={tmp_path / 'sports.csv'}", "data.known_threshold=0", "data.order=seeded"])
    perm = np.random.default_rng(5).permutation(len(names))
    assert _names(_split(cfg, monkeypatch, seed=5).forget) == [names[i] for i in perm[:16]]
    with pytest.raises(JaxeditError, match="data.order"):
        load_config(None, ["data.order=random"])


def test_default_holds_out_at_least_24_maintain_facts(monkeypatch):
    data = jaxedit.tasks.DataSettings()
    task = SportsTask(sports.load_sports())
    _stub_probs(monkeypatch, task.facts, {f.athlete for f in task.facts})
    split = task.split(None, data, seed=0)
    assert len(split.maintain_test) >= 24 and len(split.maintain_train) >= 4 * 24


def _whole_sport_facts() -> list:
    """Hand-made athletes: 10 basketball among 14 others, in a fixed order."""
    out = []
    for i in range(24):
        sport = "basketball" if i % 12 < 5 else ("football", "baseball")[i % 2]
        out.append(sports.SportsFact(f"Athlete {i}", sport, "golf", "football" if sport != "football" else "baseball"))
    return out


def test_whole_sport_attack_relearns_one_half_and_measures_the_other(monkeypatch):
    facts = _whole_sport_facts()
    task = SportsTask(facts, "sport_to_golf", sport="basketball")
    _stub_probs(monkeypatch, facts, {f.athlete for f in facts})
    data = jaxedit.tasks.DataSettings(path="given", split="basketball")  # a given file: file order
    split = task.split(None, data, seed=0)
    ball = [f.athlete for f in facts if f.sport == "basketball"]  # 10: trained 5, held out 5 (§1.1)
    assert _names(split.forget) == ball[:5] and _names(split.forget_test) == ball[5:]
    seen = {}

    class Recorder:  # the task's attack data and metrics, recording which facts they get
        def relearn_sets(self, tokenizer, facts, maintain):
            return {"forget": facts}

        def relearn_evaluate(self, model, forget, maintain, params):
            seen["held_out"] = forget
            return {"fact/forget": 0.5, "fact/maintain": 0.5}

    def relearn(model, params, sets, evaluate, settings, seed):
        seen["relearned"] = sets["forget"]
        return {f"relearn/{s}/{k}": v for s in settings.eval_at for k, v in evaluate(params).items()}

    monkeypatch.setattr(experiment, "relearn", relearn)
    settings = experiment.Settings(soft_prompt=experiment.SoftPromptSettings(enabled=False))
    experiment.attacks(SimpleNamespace(tokenizer=None), Recorder(), split, None, settings)
    assert _names(seen["relearned"]) == ball[:5]  # §5.8: the first half of the sport
    assert _names(seen["held_out"]) == ball[5:]  # measured on the whole held-out half


@pytest.mark.parametrize("model, layers, d_model, d_mlp", [("google/gemma-2-9b", (2, 3, 4, 5, 6), 3584, 14336),
                                                           ("gemma-7b", (2, 3, 4, 5, 6, 7), 3072, 24576)])
def test_paper_flu_layers_from_the_config(model, layers, d_model, d_mlp):
    """§3.2 sports rows (Gemma-2-9B MLPs 2–6, 0.771B; Gemma-7B MLPs 2–7, 1.359B), from shapes only."""
    cfg = load_config(None, [f"models=[{model}]", "localize.flu_layers=paper"])
    loaded = SimpleNamespace(source=Path("/models") / cfg.models[0].split("/")[-1], cfg=model_config(cfg.models[0]))
    inputs = pipeline.LocalizationInputs([], [], np.zeros(0), np.zeros((0, 2)), setting="sports")
    localized = pipeline.localize(loaded, inputs, ("manual_interp",), cfg.localize)
    assert localized.flu_layers == layers
    manual = components.paper_localizations(loaded.cfg, localized.flu_layers)["manual_interp"]
    assert manual.n_params == len(layers) * 3 * d_model * d_mlp


def test_sports_inputs_name_the_sports_setting():
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens=False: [len(text)])
    inputs = SportsTask(sports.load_sports()).localization_inputs(SimpleNamespace(tokenizer=tokenizer),
                                                                  _whole_sport_facts()[:3])
    assert inputs.setting == "sports"


def test_paper_flu_layers_fail_for_a_model_the_paper_did_not_use():
    cfg = load_config(None, ["localize.flu_layers=paper"])  # the default model, gemma-3-270m
    loaded = SimpleNamespace(source=Path("/cache") / cfg.models[0], cfg=None)
    inputs = pipeline.LocalizationInputs([], [], np.zeros(0), np.zeros((0, 2)), setting="sports")
    with pytest.raises(JaxeditError, match="paper used no model named 'gemma-3-270m'"):
        pipeline.localize(loaded, inputs, ("manual_interp",), cfg.localize)
    with pytest.raises(JaxeditError, match="no FLU layers for these facts"):
        pipeline.localize(SimpleNamespace(source=Path("/m/gemma-7b")), dataclasses.replace(inputs, setting=None),
                          ("manual_interp",), cfg.localize)
    with pytest.raises(JaxeditError, match="localize.flu_layers"):
        load_config(None, ["localize.flu_layers=papers"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    save_hf_model("gemma3", path)
    model = jaxedit.load(path)
    tokens, mask = padded_batch("left", lengths=(8, 6, 7), seed=11)
    subject = np.zeros(tokens.shape, bool)
    subject[0, 4:7], subject[1, 5:7], subject[2, 6:7] = True, True, True  # 3, 2 and 1 subject tokens
    return model, PromptPairs(tokens, tokens, mask, subject)


def _hand_scales(model, pairs, kind):
    """Per example: sqrt(3·std) of its own subject embeddings ('paper'), or 3·std of all of them ('rome')."""
    table = np.asarray(model.params["embed"]["tokens"], np.float64) * model.cfg.embed_scale
    if kind == "rome":
        return np.full(len(pairs.clean), 3 * table[pairs.clean[pairs.subject]].std())
    return np.array([np.sqrt(3 * table[row[hit]].std()) for row, hit in zip(pairs.clean, pairs.subject)])


@pytest.mark.parametrize("kind", ["paper", "rome"])
def test_ct_noise_key_sets_the_noise_scale(tiny, monkeypatch, kind):
    model, pairs = tiny
    cfg = load_config(None, [f"localize.ct_noise={kind}", "localize.flu_layers=[0]", "localize.ct_samples=2"])
    monkeypatch.setattr(pipeline, "corrupted_pairs", lambda model, inputs, seed: pairs)
    answer = np.array([1, 2, 3])
    inputs = pipeline.LocalizationInputs(["a", "b", "c"], ["a", "b", "c"], answer, answer[:, None])
    ct = pipeline.localize(model, inputs, ("localized_ct",), cfg.localize).ct
    np.testing.assert_allclose(ct.noise_scale, _hand_scales(model, pairs, kind), rtol=1e-5)
    if kind == "paper":
        assert np.ptp(ct.noise_scale) > 1e-3 * ct.noise_scale.mean()  # one scale per example, not one per batch


def test_ct_noise_key_rejects_unknown_kinds():
    with pytest.raises(JaxeditError, match="localize.ct_noise"):
        load_config(None, ["localize.ct_noise=3std"])


def test_counterfact_seed_orders_the_known_facts_and_partitions_name_their_settings(monkeypatch):
    facts = cf.load_counterfact()  # the built-in sample: order 'seeded'
    known = [f for f in facts if f.case_id % 4 != 3]
    monkeypatch.setattr("jaxedit.tasks.counterfact.known_facts", lambda model, rows, threshold: known)
    data = jaxedit.tasks.DataSettings(n_forget=64, pool_size=2, max_maintain=None)
    task = CounterFactTask(facts, sequential=True)
    split = task.split(None, data, seed=4)
    perm = np.random.default_rng(4).permutation(len(known))  # reference: known facts permuted, then in order
    rows = [known[i].case_id for i in perm]
    ids = lambda part: [f.case_id for f in part]  # noqa: E731
    assert ids(split.forget) == rows[:64] and ids(split.pool) == rows[-2:]
    k = int(0.8 * (len(rows) - 66))
    assert ids(split.maintain_train) == rows[64:64 + k] and ids(split.maintain_test) == rows[64 + k:-2]
    assert [ids(p) for p in split.partitions] == [rows[16 * p:16 * p + 16] for p in range(4)]
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens=False: [len(text)])
    settings = [task.localization_inputs(SimpleNamespace(tokenizer=tokenizer), list(p)).setting
                for p in split.partitions]
    assert settings == ["counterfact_0_16", "counterfact_16_32", "counterfact_32_48", "counterfact_48_64"]
    assert ids(task.split(None, data, seed=5).forget) != rows[:64]
