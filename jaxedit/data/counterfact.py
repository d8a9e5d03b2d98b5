"""CounterFact facts (method.md §1.3): loaders, splits and prompt formats (plain, paraphrase, neighborhood, MCQ).

Files: JSON (a list of records, or JSON lines), CSV (list/dict cells written as JSON or Python
literals, as in the paper's local copies) or Parquet. A record has either the flat HF-export columns
(`prompt` with the subject filled in, `subject`, `target_true`, `target_false`, `case_id`,
`paraphrase_prompts`, `neighborhood_prompts`, optional `prompt_id`) or the original nested layout
(`requested_rewrite` = {`prompt` with "{}", `subject`, `target_true`: {`str`}, `target_false` or
`target_new`: {`str`}}). An MCQ may be inline (`mcq` = {`question`, `target_true`, `targets_false`})
or come from a separate file in the `counterfact_mc_questions.parquet` layout, joined on
`prompt_id` (or `case_id` when a fact has none). Targets get exactly one leading space; every
loss and metric uses only their first token (§1.3).

MCQ option order and few-shot examples come from a numpy Generator seeded by (seed, case_id), so
a fact's MCQ prompt is the same on every call. The paper reshuffled with unseeded Python `random`
each time a batch was formatted (§10.16), which made its MCQ evals non-deterministic.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from jaxedit.data.batching import first_tokens
from jaxedit.errors import JaxeditError

_BUILTIN = Path(__file__).with_name("counterfact_sample.json")
LETTERS = ("A", "B", "C", "D")
MCQ_ANSWERS = tuple(f" {x}" for x in LETTERS)
MCQ_TEMPLATE = (
    "Help me answer the following multiple choice question:\n\n{question}\n\n"
    "A. {a}\nB. {b}\nC. {c}\nD. {d}\n\n"
    "Please respond with the letter of the correct answer, A, B, C, or D. Answer:"
)
_SPLIT = re.compile(r"first_(\d+)(?:_partition_(\d+))?_(split|unsplit)")
PARTITION = 16  # §4.5: sequential editing edits the first 64 facts in 4 partitions of 16


@dataclasses.dataclass(frozen=True)
class MCQ:
    """A multiple-choice reformulation: the true option and 3 false ones (targets_false[0] is the edit target)."""

    question: str
    target_true: str
    targets_false: tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class CounterFactFact:
    """One CounterFact case. Targets start with exactly one space; prompts contain the subject."""

    case_id: int
    prompt: str
    subject: str
    target_true: str
    target_false: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    mcq: MCQ | None = None


@dataclasses.dataclass(frozen=True)
class CounterFactSplits:
    """Forget train/test, maintain train/test (80/20 in order) and the few-shot MCQ pool."""

    forget_train: tuple[CounterFactFact, ...]
    forget_test: tuple[CounterFactFact, ...]
    maintain_train: tuple[CounterFactFact, ...]
    maintain_test: tuple[CounterFactFact, ...]
    pool: tuple[CounterFactFact, ...]


def load_counterfact(path: str | Path | None = None, mcq_path: str | Path | None = None) -> list[CounterFactFact]:
    """Facts of `path` (default: the built-in sample) in file order, MCQs joined from `mcq_path` if given."""
    path = Path(path) if path is not None else _BUILTIN
    mcqs = _mcq_table(Path(mcq_path)) if mcq_path is not None else {}
    facts = [_fact(record, i, path, mcqs) for i, record in enumerate(_read_records(path))]
    if not facts:
        raise JaxeditError(f"{path}: no CounterFact records; give a file with at least one fact")
    ids = [f.case_id for f in facts]
    if len(set(ids)) != len(ids):
        raise JaxeditError(f"{path}: case_id values must be unique; deduplicate the records")
    return facts


def _read_records(path: Path) -> list[dict]:
    """The file's records as dicts (JSON list / JSON lines, CSV, Parquet by suffix)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise JaxeditError(f"{path}: a CounterFact JSON file must be a list of records (objects)")
            return data
    except OSError as exc:
        raise JaxeditError(f"cannot read CounterFact file {path}: {exc.strerror or exc}") from None
    except (ValueError, ImportError) as exc:  # JSON / Parquet decoding errors
        raise JaxeditError(f"cannot parse CounterFact file {path}: {str(exc).splitlines()[0]}") from None
    raise JaxeditError(f"{path}: unknown CounterFact file type {suffix!r}; use .json, .jsonl, .csv or .parquet")


def _field(record: dict, name: str, where: str):
    """record[name]; JaxeditError naming the field when it is missing or empty."""
    if name not in record or record[name] is None or record[name] == "":
        raise JaxeditError(f"{where}: missing field {name!r}")
    return record[name]


def _structured(record: dict, name: str, where: str):
    """A list/dict field, parsed from a JSON or Python literal when a CSV stored it as text."""
    value = _field(record, name, where)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise JaxeditError(f"{where}: field {name!r} is not a valid list/dict literal") from None
    return value


def _text(value, name: str, where: str) -> str:
    if isinstance(value, dict):  # nested layout: {"str": ..., "id": ...}
        if "str" not in value:
            raise JaxeditError(f"{where}: missing field {name + '.str'!r}")
        value = value["str"]
    if not isinstance(value, str) or not value.strip():
        raise JaxeditError(f"{where}: field {name!r} must be a non-empty string")
    return value.strip()


def _texts(record: dict, name: str, where: str) -> tuple[str, ...]:
    """A list-of-strings field (stripped)."""
    value = _structured(record, name, where)
    if isinstance(value, (str, dict)) or not hasattr(value, "__iter__"):
        raise JaxeditError(f"{where}: field {name!r} must be a list of strings")
    return tuple(_text(v, name, where) for v in value)


def _fact(record: dict, index: int, path: Path, mcqs: dict) -> CounterFactFact:
    """One validated record, flat (has `prompt`) or nested (`requested_rewrite`)."""
    where = f"{path}: record {index}"
    try:
        case_id = int(_field(record, "case_id", where))
    except (TypeError, ValueError):
        raise JaxeditError(f"{where}: case_id must be an integer") from None
    if case_id < 0:
        raise JaxeditError(f"{where}: case_id must be ≥ 0")
    where = f"{path}: record {index} (case_id {case_id})"
    if "prompt" in record:
        subject = _text(_field(record, "subject", where), "subject", where)
        prompt = _text(_field(record, "prompt", where), "prompt", where)
        true = _text(_field(record, "target_true", where), "target_true", where)
        false = _text(_field(record, "target_false", where), "target_false", where)
    else:
        rewrite = _structured(record, "requested_rewrite", where)
        if not isinstance(rewrite, dict):
            raise JaxeditError(f"{where}: field 'requested_rewrite' must be an object")
        inner = f"{where} requested_rewrite"
        subject = _text(_field(rewrite, "subject", inner), "subject", inner)
        template = _text(_field(rewrite, "prompt", inner), "prompt", inner)
        if "{}" not in template:
            raise JaxeditError(f"{inner}: prompt {template!r} has no '{{}}' for the subject")
        prompt = template.replace("{}", subject)
        true = _text(_field(rewrite, "target_true", inner), "target_true", inner)
        new = "target_false" if "target_false" in rewrite else "target_new"
        false = _text(_field(rewrite, new, inner), "target_false", inner)
    if subject not in prompt:
        raise JaxeditError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}")
    mcq = _mcq(_structured(record, "mcq", where), where) if record.get("mcq") else None
    key = str(record.get("prompt_id") if record.get("prompt_id") not in (None, "") else case_id)
    return CounterFactFact(
        case_id=case_id, prompt=prompt, subject=subject, target_true=" " + true, target_false=" " + false,
        paraphrase_prompts=_texts(record, "paraphrase_prompts", where),
        neighborhood_prompts=_texts(record, "neighborhood_prompts", where),
        mcq=mcqs.get(key, mcq),
    )


def _mcq(record: dict, where: str) -> MCQ:
    if not isinstance(record, dict):
        raise JaxeditError(f"{where}: field 'mcq' must be an object with question, target_true, targets_false")
    false = _texts(record, "targets_false", where)
    if len(false) != 3:
        raise JaxeditError(f"{where}: targets_false has {len(false)} options; an MCQ needs exactly 3 false options")
    return MCQ(_text(_field(record, "question", where), "question", where),
               _text(_field(record, "target_true", where), "target_true", where), false)


def _mcq_table(path: Path) -> dict[str, MCQ]:
    """{prompt_id as text: MCQ} of an MCQ file (first row wins for a repeated prompt_id)."""
    table: dict[str, MCQ] = {}
    for i, record in enumerate(_read_records(path)):
        where = f"{path}: record {i}"
        table.setdefault(str(_field(record, "prompt_id", where)), _mcq(record, where))
    return table


def splits(facts: list[CounterFactFact], name: str, pool_size: int = 64) -> CounterFactSplits:
    """The forget/maintain split `name` of known facts (§1.3), after reserving the last `pool_size` as MCQ pool.

    name: 'first_{n}_unsplit' (train = test = rows 0..n-1), 'first_{n}_split' (first half train, second
    half test), 'first_64_partition_{k}_unsplit' (rows 16k..16k+15, k = 0..3, §4.5). Maintain = the
    remaining non-pool rows outside the forget set (outside all 64 rows for a partition), first 80%
    (int) train, last 20% test, in order.
    """
    match = _SPLIT.fullmatch(name)
    if not match:
        raise JaxeditError(f"unknown CounterFact split {name!r}; use first_16_unsplit, first_64_split, "
                           "first_64_partition_0_unsplit, …")
    n, part, mode = int(match[1]), match[2], match[3]
    if n < 1 or (part is not None and (n != 64 or mode != "unsplit" or int(part) > 3)):
        raise JaxeditError(f"unknown CounterFact split {name!r}; partitions are first_64_partition_{{0..3}}_unsplit")
    if not 0 <= pool_size < len(facts):
        raise JaxeditError(f"pool_size {pool_size} leaves no facts of {len(facts)} to split: lower pool_size")
    rows = list(facts[: len(facts) - pool_size])
    if len(rows) < n:
        raise JaxeditError(f"split {name} needs {n} forget facts, only {len(rows)} facts remain "
                           f"after the {pool_size}-fact pool: pass more (known) facts or a smaller split")
    forget = rows[: n] if part is None else rows[PARTITION * int(part): PARTITION * (int(part) + 1)]
    train, test = (forget[: len(forget) // 2], forget[len(forget) // 2:]) if mode == "split" else (forget, forget)
    rest = rows[n:]
    k = int(0.8 * len(rest))
    return CounterFactSplits(tuple(train), tuple(test), tuple(rest[:k]), tuple(rest[k:]),
                             tuple(facts[len(facts) - pool_size:]))


def mcq_question(question: str, options) -> str:
    """The §1.3 MCQ block of one question with its 4 options in display order."""
    a, b, c, d = options
    return MCQ_TEMPLATE.format(question=question, a=a, b=b, c=c, d=d)


def _shuffled(mcq: MCQ, rng: np.random.Generator) -> tuple[list[str], int, int]:
    """(options in a random order, letter index of target_true, letter index of targets_false[0])."""
    options = (mcq.target_true, *mcq.targets_false)
    order = rng.permutation(4)
    return [options[i] for i in order], int(np.flatnonzero(order == 0)[0]), int(np.flatnonzero(order == 1)[0])


def mcq_prompt(fact: CounterFactFact, pool, *, seed: int = 0, n_shots: int = 8) -> tuple[str, int, int]:
    """(n_shots-shot MCQ prompt, letter index of the true option, letter index of the edit option) of `fact`.

    The shots are distinct pool facts with an MCQ (never `fact` itself), each solved with " X\\n\\n";
    their choice and every option order come from np.random.default_rng([seed, case_id]).
    """
    if fact.mcq is None:
        raise JaxeditError(f"case_id {fact.case_id} has no MCQ; evaluate MCQs only on facts with one")
    shots = [p for p in pool if p.mcq is not None and p.case_id != fact.case_id]
    if len(shots) < n_shots:
        raise JaxeditError(f"the few-shot pool has {len(shots)} facts with an MCQ, {n_shots} shots need more: "
                           "enlarge pool_size or lower n_shots")
    rng = np.random.default_rng([seed, fact.case_id])
    parts = []
    for i in rng.choice(len(shots), n_shots, replace=False):
        options, true, _ = _shuffled(shots[i].mcq, rng)
        parts.append(f"{mcq_question(shots[i].mcq.question, options)} {LETTERS[true]}\n\n")
    options, true, edit = _shuffled(fact.mcq, rng)
    return "".join(parts) + mcq_question(fact.mcq.question, options), true, edit


def training_sets(tokenizer, forget, maintain_train) -> dict:
    """{'forget': (prompts, first token of target_false [N]), 'forget_true': (the same prompts, first token of
    target_true [N]: what `train.unlearn` lowers), 'maintain': (prompts, first token of target_true [M])}.

    The `sets` argument of `batching.PromptBatches` for the editing loss of §4.2.
    """
    def first(facts, field):
        return first_tokens(tokenizer, [getattr(f, field) for f in facts]) if facts else np.zeros(0, np.int32)

    return {"forget": ([f.prompt for f in forget], first(forget, "target_false")),
            "forget_true": ([f.prompt for f in forget], first(forget, "target_true")),
            "maintain": ([f.prompt for f in maintain_train], first(maintain_train, "target_true"))}
