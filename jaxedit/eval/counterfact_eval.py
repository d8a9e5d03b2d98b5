"""The paper's evaluation of a CounterFact edit (method.md §5.1–5.3), as one flat dict of metrics.

Formats and keys (forget facts carry the edit target `target_false`; every target is scored by its
first token, §1.3):
  'fact/forget', 'fact/edit', 'fact/maintain'   plain prompt: full-vocabulary P(first token of
                                                target_true / target_false / target_true)
  'paraphrase/forget', 'paraphrase/edit'        the same on every paraphrase of the forget facts
  'neighborhood/forget', 'neighborhood/edit'    the same on every neighborhood prompt of the forget
                                                facts (other subjects whose true answer is target_true)
  'mcq/forget', 'mcq/edit', 'mcq/maintain'      n-shot MCQ: P(letter) normalized over " A".." D" of
                                                the true option / of targets_false[0] / the true option
each also with '_argmax': the full-vocabulary argmax is the target's first token (MCQ: the letter is
the largest of the four). Each prompt counts once (the paper re-samples 5 batches of 32, §10.15).
Facts without an MCQ drop out of the MCQ metrics; a metric with no prompts is NaN.
"""

from __future__ import annotations

import numpy as np

from jaxedit.data.batching import first_tokens
from jaxedit.data.counterfact import MCQ_ANSWERS, CounterFactFact, mcq_prompt
from jaxedit.errors import JaxeditError
from jaxedit.readout import token_log_probs


def known_facts(model, facts: list[CounterFactFact], threshold: float = 0.5, params=None,
                batch_size: int = 16) -> list[CounterFactFact]:
    """The facts (in order) whose plain prompt gives P(first token of target_true) ≥ threshold (§1.3)."""
    ids = first_tokens(model.tokenizer, [f.target_true for f in facts])
    logp, _ = token_log_probs(model, [f.prompt for f in facts], ids[:, None], params, batch_size)
    return [f for f, p in zip(facts, np.exp(logp[:, 0])) if p >= threshold]


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _target_probs(model, prompts: list[str], facts: list[CounterFactFact], params, batch_size):
    """Full-vocab P [N,2] of the first tokens of (target_true, target_false) of facts[i] after prompts[i],
    and whether each is the argmax token [N,2]."""
    if not prompts:
        return np.zeros((0, 2)), np.zeros((0, 2), bool)
    ids = np.stack([first_tokens(model.tokenizer, [f.target_true for f in facts]),
                    first_tokens(model.tokenizer, [f.target_false for f in facts])], axis=1)
    logp, top = token_log_probs(model, prompts, ids, params, batch_size)
    return np.exp(logp), top[:, None] == ids


def _put(out: dict, key: str, probs, hits) -> None:
    out[key], out[key + "_argmax"] = _mean(probs), _mean(hits)


FORMATS = ("fact", "paraphrase", "neighborhood", "mcq")


def evaluate_counterfact(model, forget: list[CounterFactFact], maintain: list[CounterFactFact],
                         pool: list[CounterFactFact], *, params=None, seed: int = 0, n_shots: int = 8,
                         batch_size: int = 16, formats=FORMATS) -> dict[str, float]:
    """Every metric of the module doc for `params` (default the model's) in `formats`; MCQ shots from `pool`."""
    unknown = set(formats or FORMATS) - set(FORMATS)
    if unknown:
        raise JaxeditError(f"unknown CounterFact format(s) {sorted(unknown)}: use some of {', '.join(FORMATS)}")
    formats = formats or FORMATS
    out: dict[str, float] = {}
    facts = list(forget) + list(maintain)
    if "fact" in formats:
        probs, hits = _target_probs(model, [f.prompt for f in facts], facts, params, batch_size)
        n = len(forget)
        _put(out, "fact/forget", probs[:n, 0], hits[:n, 0])
        _put(out, "fact/edit", probs[:n, 1], hits[:n, 1])
        _put(out, "fact/maintain", probs[n:, 0], hits[n:, 0])
    for fmt, field in (("paraphrase", "paraphrase_prompts"), ("neighborhood", "neighborhood_prompts")):
        if fmt not in formats:
            continue
        pairs = [(p, f) for f in forget for p in getattr(f, field)]
        probs, hits = _target_probs(model, [p for p, _ in pairs], [f for _, f in pairs], params, batch_size)
        _put(out, f"{fmt}/forget", probs[:, 0], hits[:, 0])
        _put(out, f"{fmt}/edit", probs[:, 1], hits[:, 1])
    if "mcq" in formats:
        out |= _mcq_metrics(model, forget, maintain, pool, params, seed, n_shots, batch_size)
    return out


def _mcq_metrics(model, forget, maintain, pool, params, seed, n_shots, batch_size) -> dict[str, float]:
    """'mcq/forget', 'mcq/edit', 'mcq/maintain' (+ '_argmax'): 4-way letter probabilities, one pass."""
    asked = [(f, group) for group, facts in (("forget", forget), ("maintain", maintain))
             for f in facts if f.mcq is not None]
    made = [mcq_prompt(f, pool, seed=seed, n_shots=n_shots) for f, _ in asked]
    letters = first_tokens(model.tokenizer, list(MCQ_ANSWERS))
    logp, _ = token_log_probs(model, [m[0] for m in made], np.tile(letters, (len(made), 1)), params, batch_size)
    probs = np.exp(logp - logp.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    true = np.array([m[1] for m in made], np.int64)
    edit = np.array([m[2] for m in made], np.int64)
    group = np.array([g for _, g in asked])
    out: dict[str, float] = {}
    for name, rows, labels in (("forget", group == "forget", true), ("edit", group == "forget", edit),
                               ("maintain", group == "maintain", true)):
        idx = np.flatnonzero(rows)
        _put(out, f"mcq/{name}", probs[idx, labels[idx]], probs[idx].argmax(-1) == labels[idx])
    return out
