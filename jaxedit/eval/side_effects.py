"""Side effects of an edit (method.md §5.4, §5.5, §5.9): general-text CE/accuracy/KL and MMLU.

`general_text_metrics` is the paper's "Pile accuracy" analog on any (tokens, mask) windows
(`data.text`; the experiment scores the held-out ones of `text.GeneralText`, never the LM term's);
`evaluate_mmlu` is lm-eval's 0-shot (or k-shot) MMLU from a local copy of the hendrycks CSVs,
scored by the argmax over the " A".." D" logits.
"""

from __future__ import annotations

import csv
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.data.batching import fixed_batches
from jaxedit.errors import JaxeditError
from jaxedit.models import core
from jaxedit.readout import candidate_probs
from jaxedit.sharding import on_data

LETTERS = ("A", "B", "C", "D")
MMLU_LAYOUT = ("<dir>/test/<subject>_test.csv (and <dir>/dev/<subject>_dev.csv for k-shot), no header, "
               "columns question,A,B,C,D,answer letter")


@partial(jax.jit, static_argnames="cfg")
def _text_sums(params, reference, tokens, mask, cfg):
    """Sums over a batch [B,T]: CE and correct argmax over real next tokens, their count, KL over real positions."""
    logits, _ = core.forward(params, tokens, cfg, attention_mask=mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B,T,V]
    target = tokens[:, 1:]
    real = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    picked = jnp.take_along_axis(logp[:, :-1], target[..., None], axis=-1)[..., 0]
    correct = (logp[:, :-1].argmax(-1) == target).astype(jnp.float32)
    sums = {"ce": -(picked * real).sum(), "correct": (correct * real).sum(), "n_next": real.sum()}
    if reference is not None:
        ref_logits, _ = core.forward(reference, tokens, cfg, attention_mask=mask)
        ref = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
        kl = (jnp.exp(ref) * (ref - logp)).sum(-1)
        sums |= {"kl": (kl * mask).sum(), "n_real": mask.sum().astype(jnp.float32)}
    return sums


def general_text_metrics(model, tokens, mask, params=None, reference_params=None, batch_size: int = 8) -> dict:
    """Next-token CE and argmax accuracy over real tokens of windows tokens/mask [N,T]; with
    reference_params also the mean per-position KL(reference || params) over real positions.

    params default to model.params. Returns {'ce', 'accuracy', 'tokens' (real next tokens scored)}
    and 'kl'. `fixed_batches` of batch_size rows (repeats masked out): one compile; each batch shards
    over the 'data' axis of the mesh `params` live on (`sharding.on_data`).
    """
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
    if tokens.ndim != 2 or tokens.shape != mask.shape or not len(tokens):
        raise JaxeditError(f"tokens {tokens.shape} and mask {mask.shape} must be one non-empty [N,T] shape")
    params = model.params if params is None else params
    total = None
    for _, rows, n_real in fixed_batches(len(tokens), batch_size):
        m = mask[rows] * (np.arange(batch_size) < n_real)[:, None]  # repeated rows masked out
        sums = _text_sums(params, reference_params, *on_data(params, (tokens[rows], m)), model.cfg)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.device_get(total)
    n_next = max(float(total["n_next"]), 1.0)
    out = {"ce": float(total["ce"]) / n_next, "accuracy": float(total["correct"]) / n_next,
           "tokens": int(total["n_next"])}
    if reference_params is not None:
        out["kl"] = float(total["kl"]) / max(float(total["n_real"]), 1.0)
    return out


def mmlu_prompt(subject: str, row: list[str], shots: list[list[str]] = ()) -> str:
    """lm-eval's mmlu prompt: description, k solved dev questions, then the question ending in "Answer:"."""
    def question(r):
        options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, r[1:5]))
        return f"{r[0].strip()}\n{options}Answer:"

    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(f"{question(s)} {s[5].strip()}\n\n" for s in shots) + question(row)


def read_mmlu_csv(path: Path) -> list[list[str]]:
    """Rows [question, A, B, C, D, answer letter] of one hendrycks CSV (no header)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    for number, row in enumerate(rows, 1):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise JaxeditError(f"row {number} of {path} is not question,A,B,C,D,answer letter (A-D): "
                               f"fix the file; expected layout {MMLU_LAYOUT}")
    return rows


def mmlu_subjects(data_dir: str | os.PathLike) -> list[str]:
    """Subjects with a test file under data_dir (sorted)."""
    test_dir = Path(data_dir) / "test"
    subjects = sorted(p.name[:-len("_test.csv")] for p in test_dir.glob("*_test.csv")) if test_dir.is_dir() else []
    if not subjects:
        raise JaxeditError(f"no MMLU test files under {data_dir}: expected {MMLU_LAYOUT}")
    return subjects


def evaluate_mmlu(model, data_dir: str | os.PathLike, params=None, k_shot: int = 0, limit: int | None = None,
                  subjects: list[str] | None = None, batch_size: int = 8) -> dict:
    """MMLU accuracy: argmax over the logits of " A".." D" after each prompt (= lm-eval's loglikelihood
    choice when each letter is one token). k_shot: the first k dev questions of the subject (lm-eval's
    first_n sampler); limit: the first `limit` test questions per subject.

    Returns {'accuracy' (mean over questions, lm-eval's `acc`), 'questions', 'subjects' {subject: accuracy}}.
    """
    data_dir = Path(data_dir)
    available = mmlu_subjects(data_dir)
    subjects = available if subjects is None else list(subjects)
    unknown = sorted(set(subjects) - set(available))
    if unknown:
        raise JaxeditError(f"no MMLU test file for {unknown} under {data_dir}: expected {MMLU_LAYOUT}")
    choices = [" " + letter for letter in LETTERS]
    if any(len(model.tokenizer.encode(c, add_special_tokens=False)) != 1 for c in choices):
        raise JaxeditError("the tokenizer splits ' A'..' D' into several tokens: letter scoring needs one token each")
    prompts, labels, owner = [], [], []
    for subject in subjects:
        rows = read_mmlu_csv(data_dir / "test" / f"{subject}_test.csv")[:limit]
        shots = _dev_rows(data_dir, subject, k_shot)
        prompts += [mmlu_prompt(subject, row, shots) for row in rows]
        labels += [LETTERS.index(row[5].strip()) for row in rows]
        owner += [subject] * len(rows)
    if not prompts:
        raise JaxeditError(f"the MMLU files under {data_dir} have no questions: expected {MMLU_LAYOUT}")
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a padded batch
    probs = np.empty((len(prompts), len(LETTERS)), np.float32)
    probs[order] = candidate_probs(model, [prompts[i] for i in order], choices, params, batch_size)
    correct = probs.argmax(-1) == np.asarray(labels)
    owner = np.asarray(owner)
    per_subject = {s: float(correct[owner == s].mean()) for s in subjects if (owner == s).any()}
    return {"accuracy": float(correct.mean()), "questions": len(prompts), "subjects": per_subject}


def _dev_rows(data_dir: Path, subject: str, k_shot: int) -> list[list[str]]:
    if k_shot <= 0:
        return []
    path = data_dir / "dev" / f"{subject}_dev.csv"
    if not path.is_file():
        raise JaxeditError(f"{k_shot}-shot needs {path}: expected {MMLU_LAYOUT}")
    rows = read_mmlu_csv(path)
    if len(rows) < k_shot:
        raise JaxeditError(f"{path} has {len(rows)} questions, fewer than k_shot={k_shot}: lower k_shot")
    return rows[:k_shot]
