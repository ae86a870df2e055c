"""The example notebook runs (tiny model here; the real SmolLM2 run is behind the slow marker)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lora_dapt.rundir import MERGE_REPORT

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "continued_pretraining.ipynb"


def _run(tmp_path: Path, params: str, timeout: int) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    cell.source = params
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    text, images = [], 0
    for c in nb.cells:
        for o in c.get("outputs", []):
            text.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
            images += "image/png" in o.get("data", {})
    return "\n".join(text), images


def test_notebook_on_tiny_model(tiny_model_dir, domain_files, tmp_path):
    corpus = domain_files[0].parent
    nb = _run(
        tmp_path,
        f"MODEL_DIR = {str(tiny_model_dir)!r}\nCORPUS_DIR = {str(corpus)!r}\nOUTPUT = 'run'\nSTEPS = 4\nSEQ_LEN = 64",
        timeout=600,
    )
    text, images = _outputs(nb)
    assert "ppl before" in text and "domain" in text
    assert images == 1  # the loss curve, inline
    merge = json.loads((tmp_path / "run" / "merged" / MERGE_REPORT).read_text())
    assert merge["passed"] is True and merge["dtype"] == "float32" and merge["eval_tokens"] > 0
    assert merge["max_abs_logit_diff"] <= merge["tolerance"] * merge["logit_scale"]
    assert all(math.isfinite(r["loss"]) for r in merge["losses"].values() if r is not None)
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.mark.slow
def test_notebook_on_smollm2(tmp_path):
    pytest.importorskip("gguf")
    nb = _run(
        tmp_path,
        "MODEL_DIR = None\nCORPUS_DIR = None\nOUTPUT = 'run'\nSTEPS = 6\nSEQ_LEN = 256",
        timeout=1800,
    )
    text, images = _outputs(nb)
    assert "ppl before" in text and images == 1
