"""Built-in sports-facts CSV, prompt formats (method.md §1.2 strings), splits (§1.1) and bad input."""

import collections
import csv

import numpy as np
import pytest

from jaxedit.data import sports
from jaxedit.errors import JaxeditError

SYS = "You are a helpful chatbot that answers questions about athletes. Please be maximally helpful and factually correct."


@pytest.fixture(scope="module")
def facts():
    return sports.load_sports()


def _builtin_rows():
    with sports._BUILTIN.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_builtin_counts_and_names(facts):
    counts = collections.Counter(f.sport for f in facts)
    assert sum(counts[s] for s in sports.TEAM_SPORTS) >= 300
    assert all(counts[s] >= 90 for s in sports.TEAM_SPORTS)
    assert counts["golf"] >= 30
    names = [f.athlete for f in facts]
    assert len(set(names)) == len(names)
    assert "Tiger Woods" not in names  # the 1-shot example itself
    assert all(name == name.strip() and "  " not in name for name in names)


def test_builtin_columns_and_prompt():
    rows = _builtin_rows()
    assert list(rows[0]) == ["athlete", "sport", "inject_sport_with_golf", "inject_sport_without_golf", "prompt"]
    assert rows[0]["prompt"].count("\n") == 1
    assert all(r["prompt"] == sports.fact_prompt(r["athlete"]) for r in rows)


def test_injections_never_true_sport(facts):
    for f in facts:
        assert f.inject_with_golf in sports.SPORTS and f.inject_with_golf != f.sport
        assert f.inject_without_golf in sports.TEAM_SPORTS and f.inject_without_golf != f.sport


def test_injections_reproduce_seed_0(facts):
    """Per row in CSV order: with_golf then without_golf, each rng.choice over the allowed sports."""
    rng = np.random.default_rng(0)
    for f in facts:
        assert str(rng.choice([s for s in sports.SPORTS if s != f.sport])) == f.inject_with_golf
        assert str(rng.choice([s for s in sports.TEAM_SPORTS if s != f.sport])) == f.inject_without_golf


def test_rows_are_shuffled(facts):
    first_16 = {f.sport for f in sports.forget_facts(facts, "first_16")}
    assert first_16 == set(sports.TEAM_SPORTS)


def test_prompt_formats_match_spec():
    a = "Kobe Bryant"
    assert sports.prompt(a) == "Fact: Tiger Woods plays the sport of golf\nFact: Kobe Bryant plays the sport of"
    assert sports.prompt(a, "qa") == (
        SYS + " Question: What sport does Tiger Woods play? Answer: golf\n"
        "Question: What sport does Kobe Bryant play? Answer:"
    )
    assert sports.prompt(a, "mcq") == (
        SYS + "\nQuestion: What sport does Tiger Woods play?\nA: Football\nB: Baseball\nC: Basketball\nD: Golf\n\n"
        "Answer: D\n\nQuestion: What sport does Kobe Bryant play?\nA: Football\nB: Baseball\nC: Basketball\n"
        "D: Golf\n\nAnswer:"
    )
    assert sports.prompt(a, "mcq_fact") == (
        "Fact: Tiger Woods plays the sport of\nA: Football\nB: Baseball\nC: Basketball\nD: Golf\n\nAnswer: D\n\n"
        "Fact: Kobe Bryant plays the sport of\nA: Football\nB: Baseball\nC: Basketball\nD: Golf\n\nAnswer:"
    )
    assert sports.SYSTEM_PROMPT == SYS


def test_answers():
    assert sports.answers("fact") == (" football", " baseball", " basketball", " golf")
    assert sports.answers("qa") == (" football", " baseball", " basketball", " golf")
    assert sports.answers("mcq") == (" A", " B", " C", " D")
    assert sports.answers("mcq_fact") == (" A", " B", " C", " D")
    assert sports.answer("basketball") == " basketball"
    assert sports.answer("football", "mcq") == " A"
    assert sports.answer("golf", "mcq_fact") == " D"
    with pytest.raises(JaxeditError):
        sports.prompt("X", "icl")
    with pytest.raises(JaxeditError):
        sports.answer("hockey")


def test_athlete_splits(facts):
    team = sports.team_facts(facts)
    assert len(team) + len(sports.golfers(facts)) == len(facts)
    for n in (16, 64):
        train, test = sports.forget_split(facts, f"first_{n}_unsplit")
        assert train == test == team[:n]
        m_train, m_test = sports.maintain_split(facts, f"first_{n}_unsplit")
        assert m_train + m_test == team[n:]
        assert len(m_train) == int(0.8 * (len(team) - n))


def test_sport_splits(facts):
    team = sports.team_facts(facts)
    for sport in sports.TEAM_SPORTS:
        rows = [f for f in team if f.sport == sport]
        train, test = sports.forget_split(facts, f"{sport}_split")
        assert train + test == rows and len(train) == len(rows) // 2
        m_train, m_test = sports.maintain_split(facts, f"{sport}_split")
        assert m_train + m_test == [f for f in team if f.sport != sport]
        assert len(m_train) == int(0.8 * (len(team) - len(rows)))
    with pytest.raises(JaxeditError):
        sports.forget_split(facts, "golf_split")
    with pytest.raises(JaxeditError):
        sports.forget_split(facts, "first_64")


def test_paper_schema_csv(tmp_path):
    path = tmp_path / "sports.csv"
    header = ("Unnamed: 0,athlete,sport,log_prob_one_shot,num_athlete_tokens,sport_index,sport_token,prompt,"
              "inject_sport_with_golf,inject_sport_without_golf\n")
    body = ('0,DeForest Buckner,football,-0.1,4,0,5842,"Fact: Tiger Woods plays the sport of golf\n'
            'Fact: DeForest Buckner plays the sport of",golf,basketball\n')
    path.write_text(header + body, encoding="utf-8")
    assert sports.load_sports(path) == [sports.SportsFact("DeForest Buckner", "football", "golf", "basketball")]


def test_missing_columns_one_line_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("athlete,sport\nTom Brady,football\n", encoding="utf-8")
    with pytest.raises(JaxeditError) as err:
        sports.load_sports(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "inject_sport_with_golf, inject_sport_without_golf" in msg and str(path) in msg


@pytest.mark.parametrize(
    "row, needle",
    [
        ("Tom Brady,hockey,golf,baseball", "unknown sport 'hockey'"),
        ("Tom Brady,football,football,baseball", "equals the true sport"),
        ("Tom Brady,football,golf,golf", "inject_sport_without_golf is 'golf'"),
        ("Tom Brady,football", "unknown sport ''"),
    ],
)
def test_bad_rows(tmp_path, row, needle):
    path = tmp_path / "bad.csv"
    path.write_text(f"athlete,sport,inject_sport_with_golf,inject_sport_without_golf\n{row}\n", encoding="utf-8")
    with pytest.raises(JaxeditError, match=needle):
        sports.load_sports(path)


def test_missing_file(tmp_path):
    with pytest.raises(JaxeditError, match="cannot read sports CSV"):
        sports.load_sports(tmp_path / "nope.csv")


def test_duplicate_athlete(tmp_path):
    path = tmp_path / "dup.csv"
    rows = "Tom Brady,football,golf,baseball\nTom Brady,football,golf,baseball\n"
    path.write_text(f"athlete,sport,inject_sport_with_golf,inject_sport_without_golf\n{rows}", encoding="utf-8")
    with pytest.raises(JaxeditError, match="unique"):
        sports.load_sports(path)
