"""The package's front door: exactly the public API of ARCHITECTURE.md, importable without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lora_dapt as ld

PUBLIC = {
    # stages
    "load_base_model",
    "apply_lora",
    "prepare_corpus",
    "continued_pretrain",
    "perplexity",
    "merge_adapter",
    "export_gguf",
    "tune",
    "TuneConfig",
    "extend_vocabulary",
    "sft",
    "estimate_memory",
    "plan",
    "run",
    # configs
    "ModelConfig",
    "AdapterConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "MergeConfig",
    "SFTConfig",
    "RunConfig",
    # results and the run directory
    "LoadedModel",
    "ModelSource",
    "Corpus",
    "CorpusStats",
    "TrainResult",
    "EvalResult",
    "GGUFExport",
    "TuneResult",
    "RunDir",
    # errors
    "LoraDaptError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "TrainingError",
    "MergeError",
    "ExportError",
    "RunDirError",
}


def test_exports_exactly_the_public_api():
    assert set(ld.__all__) == PUBLIC
    assert len(ld.__all__) == len(PUBLIC)  # no name listed twice


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_resolves_to_its_definition(name):
    obj = getattr(ld, name)
    assert obj.__name__ == name
    assert obj.__module__.startswith("lora_dapt.")


def test_helpers_stay_in_their_submodules():
    for name in ("evaluate_texts", "merge_run", "format_forgetting", "load_adapter", "pack_documents"):
        with pytest.raises(AttributeError, match=name):
            getattr(ld, name)
    from lora_dapt.evaluate.score import evaluate_texts
    from lora_dapt.export.merge import merge_run

    assert callable(evaluate_texts) and callable(merge_run)


def test_errors_share_one_base():
    errors = sorted(n for n in PUBLIC if n.endswith("Error") and n != "LoraDaptError")
    assert len(errors) == 7
    for name in errors:
        assert issubclass(getattr(ld, name), ld.LoraDaptError), name


def test_import_is_light():
    code = "import sys, lora_dapt; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
