"""Fact-lookup (FLU) localization, method.md §3.2: probes, extraction heads, enrichment MLPs, layer choice.

Pipeline (`fact_lookup`): linear probes per layer on the residual stream at the subject's last
token, for the full prompt and for the name alone (`<bos>{subject}`); path patching of every
head to the final residual (extraction heads); receiver = the earliest layer among the top-k
heads by |score|; path patching of every MLP to resid_pre of the receiver (enrichment MLPs);
selection attr_l = score_l − score_{L-1}, chosen = {l : |attr_l| > threshold}. The paper's own
layer lists (hand-picked for sports, §10.6) are data in `PAPER_FLU_LAYERS` (`localize.flu_layers: paper`).
Axes: N examples, B batch, T positions, D d_model, L layers, H heads.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.localize.artifacts import ScoreArray
from jaxedit.localize.corruptions import resample_subjects, subject_positions
from jaxedit.localize.path_patching import PathPatchResult, enrichment_mlp_scores, extraction_head_scores
from jaxedit.localize.probes import ProbeResult, probe_accuracy
from jaxedit.models.config import ModelConfig
from jaxedit.readout import resid_at
from jaxedit.tokenizer import pad

_SPORTS = {"gemma-7b": range(2, 8), "gemma-2-9b": range(2, 7), "llama-3-8b": range(1, 5)}
_COUNTERFACT = {  # setting suffix -> layers, per model (…_manual_layers_{a}_{b}.json)
    "gemma-7b": {"0_64": (1, 3, 4, 6, 12), "0_16": (1, 3, 4, 6, 9, 17, 18, 19), "16_32": (3, 6, 9, 18, 19),
                 "32_48": (0, 1, 3, 5, 7, 9, 11, 12, 13, 18, 19), "48_64": (0, 1, 3, 4, 6, 12, 19)},
    "gemma-2-9b": {"0_64": (3, 4, 5, 7, 8, 9, 10, 17), "0_16": (3, 4, 7, 8, 9), "16_32": (4, 7, 8, 9, 17),
                   "32_48": (3, 5, 7, 8, 9, 10, 16), "48_64": (3, 4, 5, 7, 8, 9, 10, 15, 18, 21, 22)},
    "llama-3-8b": {"0_64": (4, 5, 6, 7), "0_16": (5, 6, 9, 13), "16_32": (2, 5, 6, 7, 9, 10),
                   "32_48": (2, 4, 5, 6, 7), "48_64": (6, 7, 8)},
}
PAPER_FLU_LAYERS: dict[str, dict[str, tuple[int, ...]]] = {
    model: {"sports": tuple(_SPORTS[model])} | {f"counterfact_{k}": v for k, v in cf.items()}
    for model, cf in _COUNTERFACT.items()
}


def paper_flu_layers(model: str, setting: str) -> tuple[int, ...]:
    """The paper's FLU MLP layers, e.g. ('gemma-7b', 'sports') or ('llama-3-8b', 'counterfact_0_64')."""
    if model not in PAPER_FLU_LAYERS or setting not in PAPER_FLU_LAYERS[model]:
        known = "; ".join(f"{m}: {', '.join(s)}" for m, s in PAPER_FLU_LAYERS.items())
        raise JaxeditError(f"no paper FLU layers for model {model!r}, setting {setting!r}: known are {known}")
    return PAPER_FLU_LAYERS[model][setting]


def receiver_layer(head_scores, top_k: int = 10) -> int:
    """Earliest layer among the top_k heads by |score| (head_scores [L,H]): where enrichment is measured."""
    head_scores = np.asarray(head_scores)
    top = np.argsort(-np.abs(head_scores), axis=None, kind="stable")[:top_k]
    return int(np.unravel_index(top, head_scores.shape)[0].min())


def select_layers(mlp_scores, threshold: float = 0.02) -> tuple[np.ndarray, tuple[int, ...]]:
    """(attr [L] = score − score of the last layer, layers with |attr| > threshold)."""
    mlp_scores = np.asarray(mlp_scores, np.float64)
    attr = mlp_scores - mlp_scores[-1]
    return attr, tuple(int(i) for i in np.flatnonzero(np.abs(attr) > threshold))


def subject_last_tokens(tokenizer, prompts: list[str], subjects: list[str], padding_side: str = "left"):
    """(ids [N,T], mask [N,T], index [N] of the subject's last token) for full prompts."""
    rows, last = [], []
    for prompt, subject in zip(prompts, subjects, strict=True):
        ids, hits = subject_positions(tokenizer, prompt, subject)
        rows.append(ids)
        last.append(max(hits))
    ids, mask = pad(rows, tokenizer.pad_token_id, padding_side)
    shift = ids.shape[1] - np.array([len(r) for r in rows]) if padding_side == "left" else 0
    return ids, mask, np.array(last) + shift


def name_only_tokens(tokenizer, subjects: list[str], padding_side: str = "left"):
    """(ids [N,T], mask [N,T], index [N] of the last token) for `<bos>{subject}` alone."""
    rows = []
    for subject in subjects:
        ids = tokenizer.encode(subject.strip())
        bos = tokenizer.bos_token_id
        rows.append(ids if bos is None or ids[:1] == [bos] else [bos] + ids)
    ids, mask = pad(rows, tokenizer.pad_token_id, padding_side)
    index = ids.shape[1] - 1 if padding_side == "left" else np.array([len(r) - 1 for r in rows])
    return ids, mask, np.broadcast_to(index, (len(rows),)).copy()


@dataclasses.dataclass(frozen=True)
class FactLookup:
    """Everything the FLU pipeline measured, and the layers it chose."""

    probe_prompt: ProbeResult | None  # probe accuracy per layer, subject's last token in the prompt
    probe_name: ProbeResult | None  # same, on `<bos>{subject}` alone
    extraction: PathPatchResult  # head scores [L,H]
    receiver: int  # resid_pre layer the enrichment senders are patched into
    enrichment: PathPatchResult  # MLP scores [L]
    attr: np.ndarray  # [L] enrichment score minus the last layer's
    layers: tuple[int, ...]  # chosen FLU MLP layers
    threshold: float


def score_arrays(result: FactLookup, model: str = "", data_hash: str = "") -> dict[str, ScoreArray]:
    """The pipeline's measurements as labelled arrays (save each with `.save(path)`)."""
    label = dict(model=model, data_hash=data_hash)
    out = {
        "extraction_heads": ScoreArray(result.extraction.scores, ("layer", "head"), "path_patching/extraction_heads",
                                       **label),
        "enrichment_mlps": ScoreArray(result.enrichment.scores, ("layer",), "path_patching/enrichment_mlps", **label,
                                      meta={"receiver": result.receiver, "threshold": result.threshold,
                                            "attr": result.attr.tolist(), "layers": list(result.layers)}),
    }
    for name, probe in (("probe_prompt", result.probe_prompt), ("probe_name", result.probe_name)):
        if probe is not None:
            out[name] = ScoreArray(probe.test_accuracy, ("layer",), f"probe/{name}", **label,
                                   meta={"n_train": len(probe.train_index), "n_test": len(probe.test_index)})
    return out


def locate(cfg: ModelConfig, params, clean, corrupt, mask, answer, others, *, threshold: float = 0.02,
           top_k_heads: int = 10, receiver: int | None = None, probe_prompt: ProbeResult | None = None,
           probe_name: ProbeResult | None = None) -> FactLookup:
    """Path-patching part of the pipeline on aligned token arrays (see `extraction_head_scores`)."""
    extraction = extraction_head_scores(cfg, params, clean, corrupt, mask, answer, others)
    receiver = receiver_layer(extraction.scores, top_k_heads) if receiver is None else receiver
    if receiver == 0:
        raise JaxeditError("the top extraction heads include layer 0, so no MLP can feed them: pass receiver= explicitly")
    enrichment = enrichment_mlp_scores(cfg, params, clean, corrupt, mask, answer, others, receiver)
    attr, layers = select_layers(enrichment.scores, threshold)
    return FactLookup(probe_prompt, probe_name, extraction, receiver, enrichment, attr, layers, threshold)


def fact_lookup(model, prompts: list[str], subjects: list[str], answer, others, *, labels=None,
                probe_rows=None, patch_rows=None, seed: int = 0, threshold: float = 0.02, top_k_heads: int = 10,
                receiver: int | None = None, batch_size: int = 64) -> FactLookup:
    """The §3.2 pipeline on a loaded `Model` and one fact set.

    prompts/subjects: one per fact; answer: token ids [N]; others: [N] or [N,C] (logit-diff
    metric); labels: class per fact [N] for the probes (None skips probing). probe_rows /
    patch_rows: indices of the facts used for probing / path patching (default all; the paper
    probes 500 athletes and patches 64 facts). The corruption resamples subject tokens with `seed`.
    """
    n = len(prompts)
    probe_rows = np.arange(n) if probe_rows is None else np.asarray(probe_rows)
    patch_rows = np.arange(n) if patch_rows is None else np.asarray(patch_rows)
    tok, cfg, params = model.tokenizer, model.cfg, model.params
    probes = [None, None]
    if labels is not None:
        labels = np.asarray(labels)[probe_rows]
        subj = [subjects[i] for i in probe_rows]
        inputs = [subject_last_tokens(tok, [prompts[i] for i in probe_rows], subj), name_only_tokens(tok, subj)]
        probes = [probe_accuracy(resid_at(cfg, params, *x, "resid_post", batch_size), labels, seed=seed)
                  for x in inputs]
    pairs = resample_subjects(tok, [prompts[i] for i in patch_rows], [subjects[i] for i in patch_rows], seed=seed)
    return locate(cfg, params, pairs.clean, pairs.corrupt, pairs.mask, np.asarray(answer)[patch_rows],
                  np.asarray(others)[patch_rows], threshold=threshold, top_k_heads=top_k_heads, receiver=receiver,
                  probe_prompt=probes[0], probe_name=probes[1])
