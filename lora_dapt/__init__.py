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
    "load_base_model": "model.load",
    "apply_lora": "model.lora",
    "load_adapter": "model.lora",
    "prepare_corpus": "data.corpus",
    "Corpus": "data.corpus",
    "CorpusStats": "data.corpus",
    "format_stats": "data.corpus",
    "pack_documents": "data.packing",
    "continued_pretrain": "train.pretrain",
    "TrainResult": "train.pretrain",
    "perplexity": "evaluate.score",
    "bits_per_byte": "evaluate.score",
    "evaluate_texts": "evaluate.score",
    "evaluate_blocks": "evaluate.score",
    "EvalResult": "evaluate.score",
    "forgetting_report": "evaluate.forgetting",
    "format_forgetting": "evaluate.forgetting",
    "general_texts": "evaluate.forgetting",
    "generate_samples": "evaluate.generate",
    "write_report": "evaluate.report",
    "merge_adapter": "export.merge",
    "merge_run": "export.merge",
    "sft": "train.sft",
    "sft_from_config": "train.sft",
    "prepare_sft_data": "data.chat",
    "generate_chat": "evaluate.generate",
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
