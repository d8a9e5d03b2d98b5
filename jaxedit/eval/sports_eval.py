"""The paper's evaluation of a sports edit (method.md §5.1–5.3), as one flat dict of metrics.

For each prompt format (`sports.FORMATS`: 'fact' = training template "Normal, no system prompt",
'qa' = system-prompt QA "Normal", 'mcq' = MCQ with the system prompt, 'mcq_fact' = MCQ without)
and for the forget facts (with their injected sport) and the maintain facts:
  '{fmt}/forget'    mean probability of the TRUE sport, softmax over the 4 candidates (§5.1)
  '{fmt}/edit'      mean probability of the INJECTED sport (forget facts)
  '{fmt}/maintain'  mean probability of the true sport on the maintain facts
and the same with the suffix '_argmax' for argmax accuracy (the candidate is the largest).
Each fact counts once (the paper re-samples 5 batches of 32 with replacement, §10.15).
"""

from __future__ import annotations

import numpy as np

from jaxedit.data import sports
from jaxedit.errors import JaxeditError
from jaxedit.readout import candidate_probs


def accuracies(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(continuous, argmax) accuracy of probs [N,C] for candidate indices labels [N]."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if len(labels) == 0:
        return float("nan"), float("nan")
    rows = np.arange(len(labels))
    return float(probs[rows, labels].mean()), float((probs.argmax(-1) == labels).mean())


def _labels(facts, field: str) -> np.ndarray:
    return np.array([sports.SPORTS.index(getattr(f, field)) for f in facts], np.int64)


def format_metrics(fmt: str, forget_probs: np.ndarray, maintain_probs: np.ndarray, forget, maintain,
                   inject_field: str = "inject_without_golf") -> dict[str, float]:
    """Metrics of one format from candidate probabilities [N_forget,4], [N_maintain,4] (SPORTS order)."""
    out = {}
    for name, probs, labels in (("forget", forget_probs, _labels(forget, "sport")),
                                ("edit", forget_probs, _labels(forget, inject_field)),
                                ("maintain", maintain_probs, _labels(maintain, "sport"))):
        out[f"{fmt}/{name}"], out[f"{fmt}/{name}_argmax"] = accuracies(probs, labels)
    return out


def evaluate_sports(model, forget: list, maintain: list, *, params=None, formats=sports.FORMATS,
                    inject_field: str = "inject_without_golf", batch_size: int = 64) -> dict[str, float]:
    """Every metric of the module doc for `params` (default the model's), one batched pass per format (up to
    batch_size facts: the 40 of the default sweep run as one batch)."""
    unknown = set(formats) - set(sports.FORMATS)
    if unknown:
        raise JaxeditError(f"unknown sports format(s) {sorted(unknown)}: use some of {', '.join(sports.FORMATS)}")
    out = {}
    athletes = [f.athlete for f in forget] + [f.athlete for f in maintain]
    for fmt in formats:
        probs = candidate_probs(model, [sports.prompt(a, fmt) for a in athletes], list(sports.answers(fmt)),
                                params=params, batch_size=min(batch_size, len(athletes)))
        out |= format_metrics(fmt, probs[: len(forget)], probs[len(forget):], forget, maintain, inject_field)
    return out
