import functools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def gemma_dir():
    """HF directory of Gemma-3-270M, converted into the jaxedit cache once (fails if its package is missing)."""
    from jaxedit.models import registry

    return registry.resolve("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2_dir():
    from jaxedit.models import registry

    return registry.resolve("smollm2-135m")


@functools.lru_cache(maxsize=None)
def hf_gguf_reference(name: str):
    """(transformers model dequantized from the GGUF by transformers itself, its tokenizer): loaded once per session."""
    import torch
    import transformers

    from jaxedit.models import registry

    path = registry.gguf_file(name)
    kwargs = {"gguf_file": path.name}
    config = transformers.GgufConfig(dequantize=True, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                                              quantization_config=config, **kwargs)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
