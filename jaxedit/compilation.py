"""XLA compilations: count them (`CompileCounter`), and keep them across runs (`use_persistent_cache`).

A program is compiled once per process for each (function, static arguments, input shapes and
shardings); the counter sees every such build, by function name, including builds that the
persistent cache serves from disk (those skip XLA's work but are still counted here).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import jax
from jax import monitoring

_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """`with CompileCounter() as c: ...` then `c.counts` {function name: programs built} and `c.total`."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == _EVENT:
            self.counts[kwargs.get("fun_name", "?")] += 1

    def __enter__(self) -> CompileCounter:
        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        monitoring.unregister_event_duration_listener(self._listen)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def use_persistent_cache(folder: str | os.PathLike) -> Path | None:
    """Store compiled programs under `folder` (JAX's persistent compilation cache) unless the user chose
    a folder (`JAX_COMPILATION_CACHE_DIR` or the jax config); returns the folder in use (None: off)."""
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return Path(chosen)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder
