"""Training: continued pre-training (:func:`continued_pretrain`) and instruction tuning (:func:`sft`).

The names below are imported on first use, so ``import lora_dapt`` does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "continued_pretrain": "pretrain",
    "TrainResult": "pretrain",
    "sft": "sft",
    "sft_from_config": "sft",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lora_dapt.train' has no attribute {name!r}")
