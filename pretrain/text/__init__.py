"""Text side of the semantic objective: a byte-level BPE tokenizer (`tokenizers`) and a CLIP-style tower.

The names are imported on first use: `pretrain data ...` loads `pretrain.text.commands` to register its
sub-command, and must not pay for (or be torn down with) torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TextTokenizer": ".tokenizer",
    "train_tokenizer": ".tokenizer",
    "TextTransformer": ".tower",
}

__all__ = ["TextTokenizer", "TextTransformer", "train_tokenizer"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
