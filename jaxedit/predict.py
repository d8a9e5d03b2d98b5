"""`python -m jaxedit.predict`: what a model says next, and which layer decides it.

Loads a model (default the offline Gemma-3-270M), prints the top next tokens of each prompt and a
logit-lens table (the answer's rank when each layer's residual stream is unembedded), all from
one compiled forward per batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jaxedit
from jaxedit.errors import JaxeditError
from jaxedit.models import core
from jaxedit.readout import logits_after, read_jit

DEFAULT_PROMPTS = (
    "Fact: Michael Jordan plays the sport of",
    "Fact: Tom Brady plays the sport of",
    "Fact: Babe Ruth plays the sport of",
    "Fact: Tiger Woods plays the sport of",
    "The Eiffel Tower is located in the city of",
)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m jaxedit.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="registry name, HF directory or .gguf file")
    parser.add_argument("--prompt", action="append", help="prompt (repeatable); default: a few facts")
    parser.add_argument("--top", type=int, default=5, help="how many next tokens to show")
    parser.add_argument("--dtype", default="float32", choices=sorted(jaxedit.models.model.DTYPES))
    return parser.parse_args(argv)


def logit_lens_ranks(model: jaxedit.Model, tokens, mask, answers) -> np.ndarray:
    """Rank [L+1, B] of each answer token when unembedding resid_pre of every layer and the output."""
    got = read_jit(model.params, model.cfg, tokens, mask, ("logits", "resid_pre"))
    return np.asarray(_lens_ranks(model.params, got["resid_pre"][:, :, 0], got["logits"][:, 0], answers, model.cfg))


@partial(jax.jit, static_argnames="cfg")
def _lens_ranks(params, resid, logits, answers, cfg):
    """Ranks [L+1,B] of answers [B] among the unembedded resid [L,B,D] and the output logits [B,V]."""
    lens = jnp.concatenate([core.unembed(cfg, params, resid), logits[None]])  # [L+1,B,V]
    answer = jnp.take_along_axis(lens, answers[None, :, None], axis=2)
    return (lens > answer).sum(-1)


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        start = time.perf_counter()
        model = jaxedit.load(args.model, dtype=args.dtype)
        loaded = time.perf_counter() - start
        prompts = args.prompt or list(DEFAULT_PROMPTS)
        tokens, mask = model.encode(prompts)
    except JaxeditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = model.cfg
    print(f"{args.model}: {cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}, loaded in {loaded:.1f}s")
    start = time.perf_counter()
    logits = np.asarray(logits_after(model, prompts), np.float64)
    elapsed = time.perf_counter() - start
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for prompt, p in zip(prompts, probs):
        top = np.argsort(-p)[: args.top]
        shown = ", ".join(f"{model.tokenizer.decode([t])!r} {p[t]:.3f}" for t in top)
        print(f"\n{prompt!r}\n  next: {shown}")
    answers = jnp.asarray(probs.argmax(-1), jnp.int32)
    ranks = logit_lens_ranks(model, tokens, mask, answers)
    print("\nlogit lens: rank of the final answer when reading the residual stream at each layer")
    print("layer " + " ".join(f"{i:>4}" for i in range(len(prompts))))
    for layer, row in enumerate(ranks):
        name = f"{layer:>5}" if layer < cfg.n_layers else "  out"
        print(name + " " + " ".join(f"{r:>4}" for r in row))
    print(f"\nfirst forward (compile + run) {elapsed:.1f}s for {len(prompts)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
