"""lora_dapt: domain-adaptive continued pre-training of causal LMs with LoRA/QLoRA.

    import lora_dapt as ld
    model, tokenizer = ld.load_base_model("path/to/model", quantization="nf4")
    model = ld.apply_lora(model, ld.AdapterConfig(r=64, alpha=128))
    corpus = ld.prepare_corpus(["domain/*.txt"], tokenizer, ld.DataConfig(seq_len=1024))
    result = ld.continued_pretrain(model, tokenizer, corpus, ld.TrainConfig(output_dir="runs/demo"))

The heavy modules (torch, transformers, peft) are imported on first use of a name that needs them, so
``import lora_dapt`` and ``lora-dapt --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import (
    AdapterConfig,
    DataConfig,
    EvalConfig,
    MergeConfig,
    ModelConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)
from .errors import ConfigError, DataError, LoraDaptError, MergeError, ModelLoadError, TrainingError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_base_model": "model",
    "apply_lora": "model",
    "load_adapter": "model",
    "prepare_corpus": "corpus",
    "Corpus": "corpus",
    "CorpusStats": "corpus",
    "format_stats": "corpus",
    "pack_documents": "packing",
    "continued_pretrain": "train",
    "TrainResult": "train",
    "perplexity": "evaluate",
    "bits_per_byte": "evaluate",
    "evaluate_texts": "evaluate",
    "evaluate_blocks": "evaluate",
    "EvalResult": "evaluate",
    "forgetting_report": "evaluate",
    "format_forgetting": "evaluate",
    "general_texts": "evaluate",
    "generate_samples": "evaluate",
    "write_report": "report",
    "merge_adapter": "merge",
    "merge_run": "merge",
    "sft": "sft",
    "sft_from_config": "sft",
    "prepare_sft_data": "sft",
    "generate_chat": "sft",
    "run": "pipeline",
}

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DataConfig",
    "DataError",
    "EvalConfig",
    "LoraDaptError",
    "MergeConfig",
    "MergeError",
    "ModelConfig",
    "ModelLoadError",
    "RunConfig",
    "SFTConfig",
    "TrainConfig",
    "TrainingError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_dapt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
