"""Compile behaviour, counted: one program per length bucket of the prompts; the layer stack is one loop body."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.compilation import CompileCounter
from jaxedit.models import core
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import init_params
from jaxedit.readout import read_prompts


def _config(n_layers):
    return config_from_hf({"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 1,
                           "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16})


# Prompt lengths and the padded length each must get, by the documented rule (a multiple of 4 up to 32,
# of 8 up to 128, of 32 up to 512, at least 8), written out by hand.
BUCKETS = {1: 8, 16: 16, 17: 20, 24: 24, 25: 28, 121: 128, 129: 160, 160: 160, 161: 192}


def test_prompts_of_many_lengths_compile_one_program_per_bucket():
    """Prompts of 9 lengths read one per batch: the readout compiles one program per distinct bucket (8),
    each batch padded to its hand-computed bucket; new prompts of the same lengths compile nothing."""
    cfg = config_from_hf({"model_type": "llama", "vocab_size": 256, "hidden_size": 16, "intermediate_size": 16,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8})
    model = SimpleNamespace(params=init_params(cfg, jax.random.key(0)), cfg=cfg,
                            tokenizer=SimpleNamespace(pad_token_id=0))
    rng = np.random.default_rng(0)

    def rows():  # distinct first tokens: no shared template head
        return [[3 + i] + rng.integers(1, 256, n - 1).tolist() for i, n in enumerate(BUCKETS)]

    seen = []
    real = core.forward

    def spy(params, tokens, *args, **kwargs):
        seen.append(tokens.shape[1])  # traced once per compiled program
        return real(params, tokens, *args, **kwargs)

    core.forward = spy
    try:
        with CompileCounter() as first:
            read_prompts(model, rows(), ("logits",), batch_size=1)
        with CompileCounter() as again:
            read_prompts(model, rows(), ("logits",), batch_size=1)
    finally:
        core.forward = real
    assert first.counts["jit(read_jit)"] == len(set(BUCKETS.values())) == 8
    assert sorted(seen) == sorted(set(BUCKETS.values()))
    assert again.counts["jit(read_jit)"] == 0


def _dot_count(n_layers) -> int:
    """dot_general ops in the lowered forward of an `n_layers` model (shapes only, nothing compiled)."""
    cfg = _config(n_layers)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((4, 32), jnp.int32)

    def fn(params, tokens):
        return core.forward(params, tokens, cfg, capture=("resid_pre", "attn_z"))

    return jax.jit(fn).lower(params, tokens).as_text().count("dot_general")


def test_the_program_does_not_grow_with_depth():
    """The layers are one scanned loop body: a 24-layer forward lowers to as many matmuls as a 2-layer one."""
    shallow, deep = _dot_count(2), _dot_count(24)
    assert shallow > 5 and deep == shallow, (shallow, deep)
