"""Compile behaviour: one trace per length bucket; depth does not multiply compile time."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.models import core
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import init_params
from jaxedit.tokenizer import pad


def _config(n_layers):
    return config_from_hf({"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 1,
                           "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16})


def test_one_compile_serves_different_prompts_in_one_bucket():
    cfg = _config(2)
    params = init_params(cfg, jax.random.key(0))
    traces = []

    @jax.jit
    def last_logits(params, tokens, mask):
        traces.append(tokens.shape)
        return core.forward(params, tokens, cfg, attention_mask=mask, logit_positions=core.last_positions(mask))[0]

    rng = np.random.default_rng(0)
    outputs = []
    for lengths in [(3, 9, 5), (16, 2, 11), (7, 7, 7)]:
        ids, mask = pad([list(rng.integers(1, 256, n)) for n in lengths], 0, length=16)
        outputs.append(last_logits(params, jnp.asarray(ids), jnp.asarray(mask)))
    assert len(traces) == 1 and outputs[0].shape == (3, 1, 256)


def _compile_seconds(n_layers):
    cfg = _config(n_layers)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((4, 32), jnp.int32)

    def fn(params, tokens):
        return core.forward(params, tokens, cfg, capture=("resid_pre", "attn_z"))

    start = time.perf_counter()
    jax.jit(fn).lower(params, tokens).compile()
    return time.perf_counter() - start


def test_compile_time_does_not_grow_with_depth():
    _compile_seconds(3)  # warm up the compiler itself
    shallow = min(_compile_seconds(2) for _ in range(2))
    deep = min(_compile_seconds(24) for _ in range(2))
    assert deep < 3 * shallow, (shallow, deep)
