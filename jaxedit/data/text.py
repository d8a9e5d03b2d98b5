"""General text for the LM/KL training terms (method.md §1.4, §4.2): a user corpus or the model's own samples.

Both give fixed windows (tokens [N,T] int32, mask [N,T] int32; T = ctx): BOS, then up to ctx-1
tokens, right-padded (pad id, mask 0). `general_text` draws two disjoint sets of them (`GeneralText`):
the LM / KL terms train on one, the side-effect metrics score the other (held-out text, as a test
split would be). Sampling from the original model needs no network; its samples are cached on disk
(`registry.cache_dir()/text/`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.data.batching import cycling_order, fixed_batches
from jaxedit.errors import JaxeditError
from jaxedit.io import staged
from jaxedit.models import registry
from jaxedit.models.decode import generate

SAMPLER_VERSION = 1  # part of the cache key: bump when sampling changes what a seed gives


@dataclasses.dataclass(frozen=True)
class GeneralTextSettings:
    """The general text of the LM / KL terms and the side-effect metrics; n = 0: none."""

    corpus: str | None = None  # .txt / .jsonl / directory; null: text sampled from the original model
    n: int = 32  # training windows
    n_eval: int | None = None  # held-out windows for the side-effect metrics (null: n)
    ctx: int = 48  # tokens per window
    temperature: float = 1.0  # of the model's samples (0: greedy); unused with a corpus
    batch_size: int | None = None  # windows per micro-batch of the LM/KL term (null: the edit's batch size)


@dataclasses.dataclass(frozen=True)
class GeneralText:
    """Disjoint windows of one source: `train` (the LM / KL terms) and `held_out` (the side-effect metrics),
    each (tokens [N,ctx] int32, mask [N,ctx] int32)."""

    train: tuple[np.ndarray, np.ndarray]
    held_out: tuple[np.ndarray, np.ndarray]


def general_text(model, settings: GeneralTextSettings, seed: int = 0) -> GeneralText | None:
    """n training and n_eval held-out windows of `settings`' corpus or of the model's own samples; None when n = 0.

    One seeded draw of n + n_eval distinct windows (corpus windows never share a token; each sample
    is its own generation), split into the first n and the rest.
    """
    if not settings.n:
        return None
    n_eval = settings.n if settings.n_eval is None else settings.n_eval
    if n_eval < 1:
        raise JaxeditError(f"general_text.n_eval={n_eval}: the side-effect metrics need ≥ 1 held-out window")
    total = settings.n + n_eval
    if settings.corpus:
        tokens, mask = load_corpus(settings.corpus, model.tokenizer, total, ctx=settings.ctx, seed=seed)
    else:
        tokens, mask = sample_text(model, total, ctx=settings.ctx, seed=seed, temperature=settings.temperature)
    n = settings.n
    return GeneralText((tokens[:n], mask[:n]), (tokens[n:], mask[n:]))


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a corpus: a .txt file (blank-line separated), a .jsonl file ("text" field per line) or a
    folder of .txt files (one document each, searched recursively)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise JaxeditError(f"no .txt files in {path}: give a folder of .txt documents, a .txt or a .jsonl file")
        docs = [f.read_text(encoding="utf-8") for f in files]
    elif path.suffix == ".txt" and path.is_file():
        docs = re.split(r"\n[ \t\r]*\n", path.read_text(encoding="utf-8"))
    elif path.suffix == ".jsonl" and path.is_file():
        docs = [_jsonl_text(line, path, i) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if line.strip()]
    else:
        raise JaxeditError(f"no corpus at {path}: give a .txt file, a .jsonl file (one {{\"text\": ...}} per line) "
                           "or a folder of .txt files")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise JaxeditError(f"corpus {path} has no text: add documents")
    return docs


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise JaxeditError(f"line {number} of {path} is not JSON ({exc.msg}): write one JSON object per line") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise JaxeditError(f"line {number} of {path} has no string field \"text\": write {{\"text\": ...}} per line")
    return record["text"]


def _windows(ids: list[int], body: int) -> list[list[int]]:
    """Cut a document's ids into windows of `body` tokens: one (short) window if it fits, else the full windows."""
    if len(ids) <= body:
        return [ids] if ids else []
    return [ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]


def load_corpus(path: str | os.PathLike, tokenizer, n: int | None, ctx: int = 100, seed: int = 0):
    """n windows of a user corpus: (tokens [N,ctx] int32, mask [N,ctx] int32), N = n (None: all).

    Each window is BOS + ctx-1 consecutive tokens of one document; a document shorter than that
    gives one right-padded window, a longer one its full windows (the remainder is dropped).
    Documents are tokenized in a seeded random order until n windows are found, then n of them are
    drawn (seeded), so a large corpus is not tokenized whole.
    """
    if ctx < 2 or (n is not None and n < 1):
        raise JaxeditError(f"ctx={ctx}, n={n}: need ctx ≥ 2 and n ≥ 1")
    docs = read_documents(path)
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rng = np.random.default_rng(seed)
    found: list[list[int]] = []
    for d in rng.permutation(len(docs)):
        found += _windows(tokenizer.encode(docs[d], add_special_tokens=False), ctx - len(prefix))
        if n is not None and len(found) >= n:
            break
    if n is not None and len(found) < n:
        raise JaxeditError(f"corpus {path} gives only {len(found)} windows of {ctx} tokens, fewer than n={n}: "
                           "lower n or add text")
    chosen = [found[i] for i in rng.permutation(len(found))[:n]]
    tokens = np.full((len(chosen), ctx), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(chosen), ctx), np.int32)
    for row, ids in enumerate(chosen):
        tokens[row, :len(prefix) + len(ids)] = prefix + ids
        mask[row, :len(prefix) + len(ids)] = 1
    return tokens, mask


def sample_text(model, n: int, ctx: int = 64, seed: int = 0, temperature: float = 1.0, batch_size: int = 16,
                prompt: str | None = None, cache: bool = True):
    """n samples of the original model (model.params) from BOS (+ prompt): (tokens [n,ctx] int32, mask [n,ctx] int32).

    One compiled program per batch (a key/value-cached loop over positions, `models.decode`);
    temperature 0 is greedy. A row ends at EOS (kept) and is masked after it. Row i's sample
    depends on (seed, i), not on batch_size. With cache=True and a model loaded from disk the
    sample is stored in `cache_dir()/text/` keyed by the model files, n, ctx, seed, temperature and
    prompt, and reused.
    """
    if n < 1 or batch_size < 1 or temperature < 0:
        raise JaxeditError(f"n={n}, batch_size={batch_size}, temperature={temperature}: need n, batch_size ≥ 1 "
                           "and temperature ≥ 0")
    prefix = _prefix(model, prompt)
    if len(prefix) >= ctx:
        raise JaxeditError(f"the prompt has {len(prefix)} tokens, not fewer than ctx={ctx}: shorten it or raise ctx")
    path = _cache_path(model, n, ctx, seed, temperature, prompt) if cache else None
    if path is not None and path.is_file():
        with np.load(path) as saved:
            return saved["tokens"], saved["mask"]
    tok = model.tokenizer
    stop = {i for i in (tok.eos_token_id if tok else None, model.cfg.eos_token_id) if i is not None}
    stop_ids = jnp.asarray(sorted(stop) or [-1], jnp.int32)
    pad_id = tok.pad_token_id if tok else model.cfg.pad_token_id or 0
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(n))
    buffer = np.full((batch_size, ctx), pad_id, np.int32)
    buffer[:, :len(prefix)] = prefix
    out = [generate(model.params, buffer, len(prefix), keys[rows], stop_ids, pad_id, model.cfg, float(temperature))
           for _, rows, _ in fixed_batches(n, batch_size)]  # the last batch's repeats are cut below
    tokens = np.concatenate([np.asarray(t) for t, _ in out])[:n]
    mask = np.concatenate([np.asarray(m) for _, m in out])[:n]
    if path is not None:
        with staged(path) as tmp, tmp.open("wb") as f:
            np.savez(f, tokens=tokens, mask=mask)
    return tokens, mask


def _prefix(model, prompt: str | None) -> list[int]:
    tok = model.tokenizer
    bos = tok.bos_token_id if tok else model.cfg.bos_token_id
    if prompt is not None and tok is None:
        raise JaxeditError("a prompt needs the model's tokenizer: load a model directory with tokenizer.json")
    prefix = ([] if bos is None else [bos]) + ([] if prompt is None else tok.encode(prompt, add_special_tokens=False))
    if not prefix:
        raise JaxeditError("the model has no BOS token to start from: pass prompt=")
    return prefix


def _cache_path(model, n, ctx, seed, temperature, prompt) -> Path | None:
    """The sample's cache file, keyed by the model's files (None for a model not loaded from disk)."""
    if model.source is None:
        return None
    source = Path(model.source).resolve()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.iterdir() if f.is_file())
    key = dict(source=str(source), files=files, dtype=str(model.params["embed"]["tokens"].dtype), n=n, ctx=ctx,
               seed=seed, temperature=float(temperature), prompt=prompt, version=SAMPLER_VERSION)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return registry.cache_dir() / "text" / f"sample-{digest}.npz"


def lm_batches(tokens, mask, batch_size: int, n_batches: int, seed: int = 0):
    """Callable i -> {'tokens' [B,T], 'mask' [B,T]}: micro-batch i of cycling seeded shuffles of the windows.

    The 'lm' entry of a training batch (`edit.train`); i wraps around after n_batches.
    """
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
    if tokens.ndim != 2 or tokens.shape != mask.shape or not len(tokens):
        raise JaxeditError(f"tokens {tokens.shape} and mask {mask.shape} must be one non-empty [N,T] shape")
    rng = np.random.default_rng(seed)
    need = batch_size * n_batches
    order = cycling_order(rng.permutation, len(tokens), need)

    def batch(i: int) -> dict:
        rows = order[(i % n_batches) * batch_size:(i % n_batches + 1) * batch_size]
        return {"tokens": jnp.asarray(tokens[rows]), "mask": jnp.asarray(mask[rows])}

    return batch
