import contextlib
import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The suite compiles many small programs and runs each a few times: XLA's cheap optimization level
# cuts its compile time by about a third (measured: tests/test_interventions.py 94 → 57 CPU-s) and
# changes results only by rounding, within every tolerance here. Every process of the suite uses it
# (set before jax starts: pytest's workers, the sweep and sharding subprocesses).
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"


def xla_flags(extra: str = "") -> str:
    """XLA_FLAGS of a test process: the fast compile level plus `extra` (e.g. a host device count)."""
    return f"{FAST_COMPILE} {extra}".strip()


os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))


@pytest.fixture(scope="session")
def gemma_dir():
    """HF directory of Gemma-3-270M, converted into the jaxedit cache once (fails if its package is missing)."""
    from jaxedit.models import registry

    return registry.resolve("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2_dir():
    from jaxedit.models import registry

    return registry.resolve("smollm2-135m")


ROOT = Path(__file__).resolve().parents[1]


def shared_folder() -> Path:
    """A folder all workers of this pytest run share (xdist names the run), private to one process otherwise."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")
    folder = Path(tempfile.gettempdir()) / f"jaxedit-tests-{run}"
    folder.mkdir(exist_ok=True)
    return folder


def sweep_env(xla_cache: Path | None = None, **extra) -> dict:
    """The environment of a `python -m jaxedit.sweep` subprocess: this checkout, one CPU device unless told.

    Every sweep of this test run shares two caches: the jaxedit cache (general text one run sampled is
    read by the others) and a persistent compilation cache of every program, however quick to compile,
    from which a run loads what an earlier run compiled. xla_cache: a private compilation cache instead
    (for runs whose executables no other run can use: several devices or processes).
    """
    shared = shared_folder()
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAXEDIT_CACHE=str(shared / "jaxedit-cache"),
               JAX_COMPILATION_CACHE_DIR=str(xla_cache or shared / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(extra, XLA_FLAGS=xla_flags(extra.get("XLA_FLAGS", "")))
    return env


def tiny_sweep_config(model_dir, output, **changes) -> dict:
    """The sweep tests' config: sports, 2 localizations, 1 seed, every stage on, a few steps of each.

    The tests change what they test and keep the rest, so their sweeps build the same programs and load
    them from the shared compilation cache (`sweep_env`)."""
    config = {
        "name": "small", "task": "sports_athletes", "models": [str(model_dir)],
        "localizations": ["manual_interp", "random"], "seeds": [0],
        "data": {"n_forget": 4, "max_maintain": 10, "known_threshold": 0.0},
        "localize": {"flu_layers": [1]},
        "train": {"steps": 4, "batch_size": 4, "accumulate": 2, "lr": 1e-3, "checkpoint_every": 1},
        "general_text": {"n": 4, "ctx": 16},
        "eval": {"probe_steps": 10},
        "relearn": {"lora_rank": 2, "steps": 2, "eval_at": [0, 2], "batch_size": 2, "accumulate": 1},
        "soft_prompt": {"enabled": False},
        "output": str(output),
    }
    return config | changes


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers parses the GGUF file three times (config, tensors, tokenizer: half a minute each for
    Gemma's 262k-token vocabulary); inside this block it parses each file once and reuses the reader."""
    import gguf

    real = gguf.GGUFReader
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(real)
    try:
        yield
    finally:
        gguf.GGUFReader = real


@functools.lru_cache(maxsize=None)
def hf_gguf_reference(name: str):
    """(transformers model dequantized from the GGUF by transformers itself, its tokenizer): loaded once per session.

    transformers dequantizes in Python (about a minute for Gemma-3-270M), so the first worker saves its
    result as safetensors and the other worker loads that (the same float32 tensors).
    """
    import torch
    import transformers

    from jaxedit.models import registry

    from jaxedit.io import exclusive

    saved = shared_folder() / f"dequantized-{name}"
    with exclusive(saved):
        if not saved.is_dir():
            path = registry.gguf_file(name)
            kwargs = {"gguf_file": path.name}
            config = transformers.GgufConfig(dequantize=True, **kwargs)
            partial = saved.with_suffix(".partial")
            with _one_gguf_parse():
                model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                                                          quantization_config=config, **kwargs)
                transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs).save_pretrained(partial)
            model.save_pretrained(partial)
            partial.rename(saved)
    model = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama with SmolLM2's real tokenizer, as a HF directory (fast end-to-end runs)."""
    import jax

    from jaxedit.models.config import config_from_hf
    from jaxedit.models.model import Model, export_hf
    from jaxedit.models.params import init_params

    cfg = config_from_hf(dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=49152,
                              hidden_act="silu", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                              max_position_embeddings=256))
    model = Model(cfg, init_params(cfg, jax.random.key(0)), None, source=smollm2_dir)
    return export_hf(model, tmp_path_factory.mktemp("tiny") / "tiny-llama")


# The README's command runs the suite on 2 workers, one test file per worker at a time (`-n 2 --dist
# loadfile`, and `--no-loadscope-reorder` in pyproject.toml); files start in collection order, so the
# longest ones (measured) go first and the short ones fill in. test_sweep_grid.py starts after
# test_sweep.py's reference run has filled the shared compilation cache (`sweep_env`) it loads from.
LONGEST_FIRST = ("test_sweep.py", "test_qwen_real.py", "test_edit_training.py",
                 "test_gguf_convert.py", "test_families.py", "test_interventions.py", "test_sweep_grid.py",
                 "test_sharding.py", "test_activation_patching.py", "test_eval_attacks.py", "test_parity_tiny.py",
                 "test_localize_pipeline.py", "test_config_keys.py", "test_text_side_effects.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
