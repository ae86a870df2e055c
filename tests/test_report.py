"""report.py: report.md and PNG plots from a synthetic run directory; partial and damaged runs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import yaml

from lora_dapt.errors import LoraDaptError
from lora_dapt.evaluate.forgetting import forgetting_report
from lora_dapt.evaluate.report import RunDirError, load_metrics, write_report
from lora_dapt.evaluate.score import EvalResult


def _eval_row(phase: str, split: str, step: int, tokens: int, loss: float) -> dict:
    return {
        "type": "eval",
        "step": step,
        "tokens": tokens,
        "phase": phase,
        "split": split,
        **EvalResult.from_totals(loss * 1000, 1000, 4000).to_dict(),
    }


def make_run(root: Path, *, finished: bool = True, truncated: bool = False) -> Path:
    """A run directory as continued_pretrain leaves it: 20 logged steps of 512 tokens."""
    run = root / "run"
    run.mkdir()
    rows = [_eval_row("before", "domain", 0, 0, 3.0), _eval_row("before", "general", 0, 0, 2.0)]
    for step in range(1, 21):
        rows.append(
            {
                "type": "train",
                "step": step,
                "loss": 3.0 - 0.05 * step,
                "lr": 2e-4 * min(1.0, step / 5),
                "tokens": 512 * step,
                "tokens_per_s": 1000.0,
                "elapsed_s": 0.5 * step,
            }
        )
        if step == 10:
            rows.append(_eval_row("during", "domain", 10, 5120, 2.6))
    if finished:
        rows += [_eval_row("after", "domain", 20, 10240, 2.2), _eval_row("after", "general", 20, 10240, 2.1)]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if truncated:
        text += '{"type": "train", "step": 21, "loss": 1.9'  # a crash in the middle of a write
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "models/tiny-llama", "quantization": "nf4"},
                "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
                "train": {"learning_rate": 2e-4, "max_steps": 20},
            }
        ),
        encoding="utf-8",
    )
    if finished:
        before = {r["split"]: r for r in rows if r.get("phase") == "before"}
        after = {r["split"]: r for r in rows if r.get("phase") == "after"}
        before["samples"] = [{"prompt": "The tenant", "completion": " pays rent."}]
        after["samples"] = [{"prompt": "The tenant", "completion": " shall pay ```rent```."}]
        summary = {
            "steps": 20,
            "tokens_trained": 10240,
            "final_loss": 2.0,
            "tokens_per_s": 1234.5,
            "wall_time_s": 3725.0,
            "peak_memory_bytes": 3 * 2**30,
            "before": before,
            "after": after,
            "forgetting": forgetting_report(before, after),
            "stopped": None,
            "data_stats": {"documents": 120, "train_blocks": 40, "eval": {"documents": 6, "blocks": 2}},
        }
        (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.width > 100 and img.height > 100
        # Not a blank canvas: a plot has many colours (lines, text, antialiasing).
        assert len(img.convert("RGB").getcolors(maxcolors=1_000_000)) > 10


def test_report_of_a_finished_run(tmp_path):
    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.md"
    text = path.read_text(encoding="utf-8")
    assert_png(run / "plots" / "loss.png")
    assert_png(run / "plots" / "lr.png")
    assert "![loss](plots/loss.png)" in text and "![learning rate](plots/lr.png)" in text
    # Before/after table: ppl = exp(loss), relative change, bits per byte = loss * 1000 / ln 2 / 4000.
    domain = next(line for line in text.splitlines() if line.startswith("| domain"))
    cells = [c.strip() for c in domain.strip("|").split("|")]
    assert cells[1] == f"{math.exp(3.0):.3f}" and cells[2] == f"{math.exp(2.2):.3f}"
    assert cells[3] == f"{100 * (math.exp(2.2 - 3.0) - 1):+.1f}%"
    assert cells[4] == f"{3000 / math.log(2) / 4000:.4f}"
    general = next(line for line in text.splitlines() if line.startswith("| general"))
    assert f"{100 * (math.exp(0.1) - 1):+.1f}%" in general
    assert "forgetting." in text  # general ppl rose
    # Throughput, memory, wall time, data stats, config, samples.
    assert "1,234.5 tokens/s" in text and "3.00 GiB" in text and "1h 02m 05s" in text
    assert "| eval.documents | 6 |" in text and "| documents | 120 |" in text
    assert "| base model | models/tiny-llama |" in text and "| LoRA rank | 16 |" in text
    assert "The tenant pays rent." in text and "````text\nThe tenant shall pay ```rent```.\n````" in text
    assert "status: finished" in text and "## Missing" not in text


def test_report_of_a_run_stopped_early_says_what_is_missing(tmp_path, caplog):
    run = make_run(tmp_path, finished=False, truncated=True)
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        text = write_report(run).read_text(encoding="utf-8")
    assert "cut short" in caplog.text
    assert "status: incomplete" in text
    assert "after-training evaluation: none" in text and "`summary.json`: not found" in text
    domain = next(line for line in text.splitlines() if line.startswith("| domain"))
    assert f"{math.exp(3.0):.3f}" in domain and "| - |" in domain  # before known, after missing
    assert "| tokens trained | 10,240 |" in text  # from the last intact train row
    assert_png(run / "plots" / "loss.png")


def test_load_metrics_skips_a_truncated_last_line(tmp_path, caplog):
    run = make_run(tmp_path, truncated=True)
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        rows = load_metrics(run)
    assert len(rows) == 2 + 20 + 1 + 2
    assert rows[-1]["phase"] == "after" and max(r["step"] for r in rows) == 20
    assert "last line is cut short" in caplog.text
    # A damaged line in the middle is skipped too, naming its line number.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[3] = "not json"
    (run / "metrics.jsonl").write_text("\n".join(lines))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        assert len(load_metrics(run)) == len(rows) - 1
    assert "line 4 is not valid JSON" in caplog.text


def test_missing_run_dir_and_empty_run_dir(tmp_path):
    with pytest.raises(RunDirError, match="run directory not found") as info:
        write_report(tmp_path / "nope")
    assert isinstance(info.value, LoraDaptError)
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text(encoding="utf-8")
    assert "`metrics.jsonl`: not found" in text and "loss plot: no train or eval losses" in text
    assert not (empty / "plots" / "loss.png").exists()


def test_eval_rows_are_placed_at_the_tokens_trained_at_their_step():
    """Eval rows carry EvalResult's "tokens" (tokens scored), so their x comes from step and train rows."""
    from lora_dapt.evaluate.report import _eval_x

    train = [{"step": s, "tokens": 100 * s} for s in range(2, 11, 2)]  # logged every 2 steps
    assert _eval_x({"phase": "during", "step": 4, "tokens": 12}, train, None) == 400
    assert _eval_x({"phase": "during", "step": 5, "tokens": 12}, train, None) == 500
    assert _eval_x({"phase": "during", "step": 1, "tokens": 12}, train, None) == 100
    assert _eval_x({"phase": "during", "step": 12, "tokens": 12}, train, None) == 1200
    assert _eval_x({"phase": "after", "step": 10, "tokens": 12}, train, 1000) == 1000
    assert _eval_x({"phase": "before", "step": 0, "tokens": 12}, train, 1000) == 0
    assert _eval_x({"phase": "during", "step": 3, "tokens": 12}, [], None) == 12  # nothing better known
