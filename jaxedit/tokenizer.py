"""A torch-free tokenizer: HF `tokenizer.json` through the `tokenizers` library, plus padding.

Importing `transformers.AutoTokenizer` imports torch when torch is installed; this wrapper
reads the same files and gives the same ids (checked against `transformers` in the tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from jaxedit.errors import JaxeditError


class Tokenizer:
    """Encode/decode and pad batches. Special tokens (BOS) follow the tokenizer's own post-processor."""

    def __init__(self, model_dir: str | Path, pad_token_id: int | None = None):
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise JaxeditError(f"no tokenizer.json in {model_dir}: save the tokenizer there with save_pretrained")
        self._tok = _HFTokenizer.from_file(str(path))
        special = _special_tokens(Path(model_dir))
        self.bos_token_id = self.token_id(special.get("bos_token"))
        self.eos_token_id = self.token_id(special.get("eos_token"))
        pad = self.token_id(special.get("pad_token"))
        self.pad_token_id = next(i for i in (pad, pad_token_id, self.eos_token_id, 0) if i is not None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (with special tokens) and each token's (start, end) character span in `text`."""
        encoding = self._tok.encode(text)
        return encoding.ids, encoding.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        texts: list[str],
        padding_side: str = "right",
        length: int | None = None,
        add_special_tokens: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [B,T] int32 and attention mask [B,T] int32, padded to `length` (default: longest)."""
        rows = [self.encode(t, add_special_tokens) for t in texts]
        return pad(rows, self.pad_token_id, padding_side, length)


def pad(rows: list[list[int]], pad_id: int, padding_side: str = "right", length: int | None = None):
    """Pad token lists to one length: (ids [B,T] int32, mask [B,T] int32)."""
    if padding_side not in ("left", "right"):
        raise JaxeditError(f"padding_side {padding_side!r} is not 'left' or 'right'")
    longest = max(len(r) for r in rows)
    length = longest if length is None else length
    if longest > length:
        raise JaxeditError(f"a prompt has {longest} tokens, more than the padded length {length}: raise the length bucket")
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(length - len(row), length)
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def _special_tokens(model_dir: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json / special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            for key, value in json.loads(path.read_text()).items():
                if key in ("bos_token", "eos_token", "pad_token") and value:
                    found[key] = value["content"] if isinstance(value, dict) else value
    return found
