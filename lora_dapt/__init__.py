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
from .errors import (
    ConfigError,
    DataError,
    ExportError,
    LoraDaptError,
    MergeError,
    ModelLoadError,
    RunDirError,
    TrainingError,
)

__version__ = "0.1.0"

# The public API of ARCHITECTURE.md: public name -> submodule that defines it. Everything else is imported
# from its submodule (e.g. ``from lora_dapt.evaluate.score import evaluate_texts``).
_LAZY = {
    # stages
    "load_base_model": "model.load",
    "apply_lora": "model.lora",
    "prepare_corpus": "data.corpus",
    "continued_pretrain": "train.pretrain",
    "perplexity": "evaluate.score",
    "merge_adapter": "export.merge",
    "export_gguf": "export.gguf",
    "extend_vocabulary": "data.vocab",
    "sft": "train.sft",
    "tune": "train.tune",
    "TuneConfig": "train.tune_grid",
    "estimate_memory": "planning.memory",
    "plan": "planning.memory",
    "run": "pipeline",
    # results
    "LoadedModel": "model.load",
    "ModelSource": "model.load",
    "Corpus": "data.stats",
    "CorpusStats": "data.stats",
    "TrainResult": "train.pretrain",
    "EvalResult": "evaluate.score",
    "GGUFExport": "export.gguf",
    "TuneResult": "train.tune_grid",
    # the run directory
    "RunDir": "rundir",
}

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DataConfig",
    "DataError",
    "ExportError",
    "EvalConfig",
    "LoraDaptError",
    "MergeConfig",
    "MergeError",
    "ModelConfig",
    "ModelLoadError",
    "RunConfig",
    "RunDirError",
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
