"""evaluate.report: report.md and PNG plots from a synthetic run directory; partial and damaged runs.

The run directory is written through RunDir, as continued_pretrain writes it, and the report's tables are
parsed and compared with the numbers that went in."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from lora_dapt.errors import LoraDaptError
from lora_dapt.evaluate.forgetting import forgetting_report
from lora_dapt.evaluate.report import RunDirError, load_metrics, write_report
from lora_dapt.evaluate.score import EvalResult
from lora_dapt.rundir import EvalRow, RunDir, TrainRow

SCORED, N_BYTES = 1000, 4000
"""Every evaluation of the synthetic run scores 1000 tokens covering 4000 bytes."""


def _result(loss: float) -> dict:
    return EvalResult.from_totals(loss * SCORED, SCORED, N_BYTES).to_dict()


def _eval_row(phase: str, split: str, step: int, tokens: int, loss: float) -> dict:
    return EvalRow(step=step, phase=phase, split=split, result=_result(loss), tokens=tokens).to_dict()


def make_run(root: Path, *, finished: bool = True, truncated: bool = False) -> Path:
    """A run directory as continued_pretrain leaves it: 20 logged steps of 512 tokens."""
    run = RunDir(root / "run").create()
    rows = [_eval_row("before", "domain", 0, 0, 3.0), _eval_row("before", "general", 0, 0, 2.0)]
    for step in range(1, 21):
        rows.append(
            TrainRow(
                step=step,
                loss=3.0 - 0.05 * step,
                lr=2e-4 * min(1.0, step / 5),
                grad_norm=1.0,
                tokens=512 * step,
                tokens_per_s=1000.0,
                elapsed_s=0.5 * step,
            ).to_dict()
        )
        if step == 10:
            rows.append(_eval_row("during", "domain", 10, 5120, 2.6))
    if finished:
        rows += [_eval_row("after", "domain", 20, 10240, 2.2), _eval_row("after", "general", 20, 10240, 2.1)]
    for row in rows:
        run.append_metric(row)
    if truncated:
        with run.metrics_path.open("a", encoding="utf-8") as f:
            f.write('{"type": "train", "step": 21, "loss": 1.9')  # a crash in the middle of a write
    run.write_config(
        {
            "model": {"name_or_path": "models/tiny-llama", "quantization": "nf4"},
            "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "train": {"learning_rate": 2e-4, "max_steps": 20},
        }
    )
    if finished:
        # What evaluate_splits returns: split -> EvalResult.to_dict(), and the greedy samples.
        before = {"domain": _result(3.0), "general": _result(2.0)}
        after = {"domain": _result(2.2), "general": _result(2.1)}
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
        run.write_summary(summary)
    return run.path


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row of ``text`` whose first cell is ``first_cell``."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return [c.strip() for c in rows[0].strip().strip("|").split("|")]


def missing_section(text: str) -> list[str]:
    """The items of the report's "## Missing" list ([] when there is none)."""
    lines = text.splitlines()
    if "## Missing" not in lines:
        return []
    items = []
    for line in lines[lines.index("## Missing") + 2 :]:
        if not line.startswith("- "):
            break
        items.append(line[2:])
    return items


def bpb(loss: float) -> float:
    return loss * SCORED / math.log(2) / N_BYTES


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
    cells = table_row(text, "domain")
    assert cells[1] == f"{math.exp(3.0):.3f}" and cells[2] == f"{math.exp(2.2):.3f}"
    assert cells[3] == f"{100 * (math.exp(2.2 - 3.0) - 1):+.1f}%"
    assert cells[4] == f"{3000 / math.log(2) / 4000:.4f}"
    assert cells[4:] == [f"{bpb(3.0):.4f}", f"{bpb(2.2):.4f}", f"{SCORED:,}"]
    general = table_row(text, "general")
    assert f"{100 * (math.exp(0.1) - 1):+.1f}%" in general
    assert general[1:] == [
        f"{math.exp(2.0):.3f}",
        f"{math.exp(2.1):.3f}",
        f"{100 * (math.exp(0.1) - 1):+.1f}%",
        f"{bpb(2.0):.4f}",
        f"{bpb(2.1):.4f}",
        f"{SCORED:,}",
    ]
    assert "forgetting." in text  # general ppl rose
    notes = [line for line in text.splitlines() if "perplexity changed by" in line]
    assert notes == [
        f"Domain perplexity changed by {100 * (math.exp(-0.8) - 1):+.1f}% (lower is better).",
        f"General-text perplexity changed by {100 * (math.exp(0.1) - 1):+.1f}%: forgetting.",
    ]
    # Throughput, memory, wall time, data stats, config, samples.
    assert "1,234.5 tokens/s" in text and "3.00 GiB" in text and "1h 02m 05s" in text
    assert table_row(text, "optimizer steps")[1] == "20"
    assert table_row(text, "tokens trained")[1] == "10,240"
    assert table_row(text, "final train loss")[1] == "2.0000"
    assert table_row(text, "throughput")[1] == "1,234.5 tokens/s"
    assert table_row(text, "peak memory")[1] == "3.00 GiB"  # 3 * 2**30 bytes
    assert table_row(text, "wall time")[1] == "1h 02m 05s"  # 3725 s
    assert "| eval.documents | 6 |" in text and "| documents | 120 |" in text
    assert table_row(text, "train_blocks")[1] == "40" and table_row(text, "eval.blocks")[1] == "2"
    assert "| base model | models/tiny-llama |" in text and "| LoRA rank | 16 |" in text
    assert table_row(text, "learning rate")[1] == "0.0002" and table_row(text, "max steps")[1] == "20"
    assert "The tenant pays rent." in text and "````text\nThe tenant shall pay ```rent```.\n````" in text
    assert "status: finished" in text and "## Missing" not in text


def test_report_of_a_run_stopped_early_says_what_is_missing(tmp_path, caplog):
    run = make_run(tmp_path, finished=False, truncated=True)
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        text = write_report(run).read_text(encoding="utf-8")
    assert "cut short" in caplog.text
    assert "status: incomplete" in text
    assert "after-training evaluation: none" in text and "`summary.json`: not found" in text
    domain = table_row(text, "domain")
    assert f"{math.exp(3.0):.3f}" in domain and "-" in domain  # before known, after missing
    # From the metrics log: before known, after missing; tokens scored from the row's eval_tokens.
    assert domain[1:] == [f"{math.exp(3.0):.3f}", "-", "-", f"{bpb(3.0):.4f}", "-", f"{SCORED:,}"]
    assert table_row(text, "general")[1:3] == [f"{math.exp(2.0):.3f}", "-"]
    assert "| tokens trained | 10,240 |" in text  # from the last intact train row
    assert table_row(text, "optimizer steps")[1] == "20"  # the cut-short step 21 is not counted
    assert table_row(text, "final train loss")[1] == f"{3.0 - 0.05 * 20:.4f}"
    assert missing_section(text) == [
        "`summary.json`: not found (the run did not finish, or is still running)",
        "after-training evaluation: none (the run stopped early or was interrupted)",
    ]
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
    assert missing_section(text) == [
        "`metrics.jsonl`: not found, so there are no curves",
        "`summary.json`: not found (the run did not finish, or is still running)",
        "`config.yaml`: not found, so the configuration is not shown",
        "loss plot: no train or eval losses to draw",
        "learning-rate plot: no learning rates logged",
        "evaluations: none found (eval disabled, or the run stopped before the first one)",
    ]
    assert "_No configuration found._" in text and "status: incomplete" in text


def test_unreadable_summary_and_config_are_listed_not_fatal(tmp_path):
    run = make_run(tmp_path)
    (run / "summary.json").write_text('{"steps": 20, "tokens', encoding="utf-8")  # cut short
    (run / "config.yaml").write_text("- a list\n- not sections\n", encoding="utf-8")
    text = write_report(run).read_text(encoding="utf-8")
    missing = missing_section(text)
    assert [m.split(" (")[0] for m in missing] == ["`summary.json`: unreadable", "`config.yaml`: unreadable"]
    assert "JSONDecodeError" in missing[0] and "expected a mapping of sections" in missing[1]
    # The rest of the report still comes from the metrics log.
    assert table_row(text, "domain")[1:3] == [f"{math.exp(3.0):.3f}", f"{math.exp(2.2):.3f}"]
    assert table_row(text, "optimizer steps")[1] == "20"
    assert_png(run / "plots" / "loss.png")


def test_eval_rows_are_placed_at_the_tokens_trained_at_their_step():
    """Eval rows carry EvalResult's "tokens" (tokens scored), so their x comes from step and train rows."""
    from lora_dapt.evaluate.plots import eval_x

    train = [{"step": s, "tokens": 100 * s} for s in range(2, 11, 2)]  # logged every 2 steps
    assert eval_x({"phase": "during", "step": 4, "tokens": 12}, train, None) == 400
    assert eval_x({"phase": "during", "step": 5, "tokens": 12}, train, None) == 500
    assert eval_x({"phase": "during", "step": 1, "tokens": 12}, train, None) == 100
    assert eval_x({"phase": "during", "step": 12, "tokens": 12}, train, None) == 1200
    assert eval_x({"phase": "after", "step": 10, "tokens": 12}, train, 1000) == 1000
    assert eval_x({"phase": "before", "step": 0, "tokens": 12}, train, 1000) == 0
    assert eval_x({"phase": "during", "step": 3, "tokens": 12}, [], None) == 12  # nothing better known
