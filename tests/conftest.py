import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def resolve_or_skip(name: str):
    """HF directory of a registry model (converted into the jaxedit cache once); skip if its package is missing."""
    from jaxedit.errors import JaxeditError
    from jaxedit.models import registry

    try:
        return registry.resolve(name)
    except JaxeditError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def gemma_dir():
    return resolve_or_skip("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2_dir():
    return resolve_or_skip("smollm2-135m")
