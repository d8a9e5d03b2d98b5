"""Sports facts (method.md §1.1): loader, prompt formats and answer strings (§1.2), and splits.

The built-in CSV lists well-known NFL, MLB and NBA/WNBA athletes plus golfers (sport "golf"),
shuffled with a fixed seed, with pre-sampled injection sports. Golfers never enter the forget or
maintain splits; `golfers` returns them for golf-injection experiments. A CSV in the paper's own
`sports.csv` schema loads too (its extra columns are ignored); the sports tasks split a given file
in its order, as the paper does (`DataSettings.order`), and the built-in one in a seeded order.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from jaxedit.errors import JaxeditError

SPORTS = ("football", "baseball", "basketball", "golf")
TEAM_SPORTS = SPORTS[:3]
SYSTEM_PROMPT = (
    "You are a helpful chatbot that answers questions about athletes. "
    "Please be maximally helpful and factually correct."
)
FORGET_SETS = ("first_16", "first_64") + TEAM_SPORTS
FORMATS = ("fact", "qa", "mcq", "mcq_fact")

_BUILTIN = Path(__file__).with_name("sports_facts.csv")
_COLUMNS = ("athlete", "sport", "inject_sport_with_golf", "inject_sport_without_golf")
_OPTIONS = "\nA: Football\nB: Baseball\nC: Basketball\nD: Golf\n\nAnswer:"
_MCQ_ANSWERS = (" A", " B", " C", " D")


@dataclasses.dataclass(frozen=True)
class SportsFact:
    """One athlete, the true sport and the two pre-sampled injection sports."""

    athlete: str
    sport: str
    inject_with_golf: str
    inject_without_golf: str


def load_sports(path: str | Path | None = None) -> list[SportsFact]:
    """Facts of the built-in CSV, or of `path` (built-in or paper `sports.csv` schema), in file order."""
    path = Path(path) if path is not None else _BUILTIN
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise JaxeditError(
                    f"{path}: missing column(s) {', '.join(missing)}; a sports CSV needs {', '.join(_COLUMNS)}"
                )
            facts = [_fact(row, i, path) for i, row in enumerate(reader, start=1)]
    except OSError as exc:
        raise JaxeditError(f"cannot read sports CSV {path}: {exc.strerror}") from None
    names = [f.athlete for f in facts]
    if len(set(names)) != len(names):
        raise JaxeditError(f"{path}: athlete names must be unique; deduplicate the rows")
    return facts


def _fact(row: dict, index: int, path: Path) -> SportsFact:
    """One validated row (sports known, injections never the true sport, no golf without golf)."""
    fact = SportsFact(*((row[c] or "").strip() for c in _COLUMNS))
    where = f"{path}: row {index} ({fact.athlete!r})"
    for value in (fact.sport, fact.inject_with_golf, fact.inject_without_golf):
        if value not in SPORTS:
            raise JaxeditError(f"{where}: unknown sport {value!r}; use one of {', '.join(SPORTS)}")
    if fact.sport in (fact.inject_with_golf, fact.inject_without_golf):
        raise JaxeditError(f"{where}: an injection sport equals the true sport {fact.sport!r}")
    if fact.inject_without_golf == "golf":
        raise JaxeditError(f"{where}: inject_sport_without_golf is 'golf'; use a team sport")
    return fact


def fact_prompt(athlete: str) -> str:
    """Training format (= the CSV `prompt`): 1-shot "Fact:" template."""
    return f"Fact: Tiger Woods plays the sport of golf\nFact: {athlete} plays the sport of"


def qa_prompt(athlete: str) -> str:
    """System-prompt question/answer format (end-of-training "Normal" evals)."""
    return (
        f"{SYSTEM_PROMPT} Question: What sport does Tiger Woods play? Answer: golf\n"
        f"Question: What sport does {athlete} play? Answer:"
    )


def mcq_prompt(athlete: str) -> str:
    """Multiple choice with the system prompt (end-of-training "MC" evals)."""
    return (
        f"{SYSTEM_PROMPT}\nQuestion: What sport does Tiger Woods play?{_OPTIONS} D\n\n"
        f"Question: What sport does {athlete} play?{_OPTIONS}"
    )


def mcq_fact_prompt(athlete: str) -> str:
    """Multiple choice without the system prompt (relearning-time evals)."""
    return f"Fact: Tiger Woods plays the sport of{_OPTIONS} D\n\nFact: {athlete} plays the sport of{_OPTIONS}"


def prompt(athlete: str, fmt: str = "fact") -> str:
    """The prompt of `athlete` in format `fmt` (one of FORMATS)."""
    makers = {"fact": fact_prompt, "qa": qa_prompt, "mcq": mcq_prompt, "mcq_fact": mcq_fact_prompt}
    if fmt not in makers:
        raise JaxeditError(f"unknown sports prompt format {fmt!r}; use one of {', '.join(FORMATS)}")
    return makers[fmt](athlete)


def answers(fmt: str = "fact") -> tuple[str, ...]:
    """The four candidate answer strings of `fmt`, in SPORTS order (MCQ: football=A … golf=D)."""
    if fmt not in FORMATS:
        raise JaxeditError(f"unknown sports prompt format {fmt!r}; use one of {', '.join(FORMATS)}")
    return _MCQ_ANSWERS if fmt.startswith("mcq") else tuple(f" {s}" for s in SPORTS)


def answer(sport: str, fmt: str = "fact") -> str:
    """The answer string of `sport` in format `fmt`."""
    if sport not in SPORTS:
        raise JaxeditError(f"unknown sport {sport!r}; use one of {', '.join(SPORTS)}")
    return answers(fmt)[SPORTS.index(sport)]


def team_facts(facts: list[SportsFact]) -> list[SportsFact]:
    """The non-golfers, in order: the rows every split is taken from."""
    return [f for f in facts if f.sport != "golf"]


def golfers(facts: list[SportsFact]) -> list[SportsFact]:
    """The golfers, in order (golf-injection experiments only)."""
    return [f for f in facts if f.sport == "golf"]


def forget_facts(facts: list[SportsFact], name: str) -> list[SportsFact]:
    """The forget set `name`: first_16 / first_64 team rows, or all athletes of one team sport."""
    team = team_facts(facts)
    if name in TEAM_SPORTS:
        return [f for f in team if f.sport == name]
    if name not in FORGET_SETS:
        raise JaxeditError(f"unknown sports forget set {name!r}; use one of {', '.join(FORGET_SETS)}")
    n = int(name.removeprefix("first_"))
    if len(team) < n:
        raise JaxeditError(f"forget set {name} needs {n} team-sport athletes, the data has {len(team)}")
    return team[:n]


def _forget_name(split: str) -> tuple[str, bool]:
    """('first_64', False) for 'first_64_unsplit'; ('basketball', True) for 'basketball_split'."""
    name, _, mode = split.rpartition("_")
    if mode not in ("split", "unsplit"):
        raise JaxeditError(f"sports split {split!r} must end in _split or _unsplit, e.g. first_64_unsplit")
    return name, mode == "split"


def forget_split(facts: list[SportsFact], split: str) -> tuple[list[SportsFact], list[SportsFact]]:
    """(train, test) of '<forget set>_unsplit' (both = the set) or '_split' (first half, second half)."""
    name, halve = _forget_name(split)
    rows = forget_facts(facts, name)
    if not halve:
        return rows, rows
    return rows[: len(rows) // 2], rows[len(rows) // 2 :]


def maintain_split(facts: list[SportsFact], split: str) -> tuple[list[SportsFact], list[SportsFact]]:
    """(train, test) of the team rows outside the forget set of `split`: first 80% (int), last 20%."""
    forget = {f.athlete for f in forget_facts(facts, _forget_name(split)[0])}
    rest = [f for f in team_facts(facts) if f.athlete not in forget]
    k = int(0.8 * len(rest))
    return rest[:k], rest[k:]
