"""`Model`: config + params + tokenizer; `load` from a name or directory; export and orbax."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.errors import JaxeditError
from jaxedit.io import staged
from jaxedit.models import core, registry
from jaxedit.models.config import ModelConfig, read_model_config
from jaxedit.models.hf_checkpoint import read_params, write_safetensors
from jaxedit.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Model:
    """A loaded model. `params` is a plain pytree; `forward` is the pure, jitted `core.forward`."""

    cfg: ModelConfig
    params: dict
    tokenizer: Tokenizer | None
    source: Path | None = None

    def forward(self, tokens, params=None, **kwargs):
        """`core.forward` under jit with this model's config (see there for the arguments)."""
        params = self.params if params is None else params
        kwargs["capture"] = tuple(kwargs.get("capture", ()))  # static under jit: must be hashable
        return jitted_forward(params, jnp.asarray(tokens), self.cfg, **kwargs)

    def encode(self, texts: list[str], padding_side: str = "right", length: int | None = None):
        """(tokens [B,T], attention_mask [B,T]) as jax arrays."""
        ids, mask = self.tokenizer(texts, padding_side=padding_side, length=length)
        return jnp.asarray(ids), jnp.asarray(mask)


@partial(jax.jit, static_argnames=("cfg", "capture", "remat"))
def jitted_forward(params, tokens, cfg, **kwargs):
    return core.forward(params, tokens, cfg, **kwargs)


def load(name_or_path: str | os.PathLike, dtype: str = "float32") -> Model:
    """Load a registry name (`gemma-3-270m`, `smollm2-135m`), a HF directory or a `.gguf` file."""
    if dtype not in DTYPES:
        raise JaxeditError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    model_dir = registry.resolve(name_or_path)
    cfg = read_model_config(model_dir)
    params = jax.tree.map(lambda a: jnp.asarray(a, DTYPES[dtype]), read_params(cfg, model_dir))
    has_tokenizer = (model_dir / "tokenizer.json").is_file()
    tokenizer = Tokenizer(model_dir, cfg.pad_token_id) if has_tokenizer else None
    return Model(cfg, params, tokenizer, model_dir)


def export_hf(model: Model, out_dir: str | os.PathLike, params=None) -> Path:
    """Write params as a HF directory (config.json, model.safetensors, tokenizer) that `transformers` loads.

    Written to a temporary folder and renamed into place, so a failure leaves no partial export.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise JaxeditError(f"export target {out_dir} already exists: choose a new directory or remove it")
    params = model.params if params is None else params
    with staged(out_dir, directory=True) as staging:
        host = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.float32)), params)
        write_safetensors(model.cfg, host, staging)
        hf = model.cfg.hf_dict() | {"dtype": "float32"}
        (staging / "config.json").write_text(json.dumps(hf, indent=2))
        for name in TOKENIZER_FILES:
            if model.source is not None and (model.source / name).is_file():
                shutil.copy2(model.source / name, staging / name)
    return out_dir


def save_params(params: dict, path: str | os.PathLike) -> None:
    """Save a params pytree with orbax (sharded arrays are written per device)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), params)


def restore_params(path: str | os.PathLike, like: dict) -> dict:
    """Restore a params pytree saved by `save_params`; `like` gives shapes, dtypes and shardings."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.exists():
        raise JaxeditError(f"no orbax checkpoint at {path}: save one with save_params first")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)
