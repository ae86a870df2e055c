"""Clean output: progress bars only on a terminal, periodic log lines elsewhere (never a '\\r'), nothing with
-q but the result, and no FutureWarning / DeprecationWarning of ours in a whole `lora-dapt train`."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_dapt.cli.main import main
from lora_dapt.progress import Progress, foreign_bars_hidden, progress, track

STEPS = 4
ROOT = Path(__file__).resolve().parents[1]


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture()
def lora_dapt_level():
    """Put the lora_dapt logger's level back after the test (-q sets it)."""
    logger = logging.getLogger("lora_dapt")
    level = logger.level
    yield logger
    logger.setLevel(level)


def _config(tmp_path: Path, model_dir: Path, domain_files: list[Path]) -> Path:
    general = tmp_path / "general.txt"
    general.write_text("The weather was mild and the market stalls opened early in the morning. " * 6)
    cfg = {
        "model": {"name_or_path": str(model_dir), "quantization": "nf4"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "gradient_checkpointing": True},
        "data": {
            "sources": [str(p) for p in domain_files],
            "seq_len": 64,
            "eval_fraction": 0.25,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": STEPS,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "logging_every": 1,
            "eval_every": 3,
        },
        "eval": {"general_sources": [str(general)], "max_eval_tokens": 300, "original_base": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_to_a_pipe_has_lines_not_bars_and_no_deprecation_warnings(
    tiny_model_dir, domain_files, tmp_path
):
    cfg = _config(tmp_path, tiny_model_dir, domain_files)
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "lora_dapt.cli.main", "train", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "\r" not in err + proc.stdout
    # one line per 10% of the steps (4 steps: every step), each with its own loss
    lines = re.findall(r"lora_dapt: training: (\d)/4 step \((\d+)%\), loss=\d+\.\d{4}", err)
    assert lines == [("1", "25"), ("2", "50"), ("3", "75"), ("4", "100")]
    assert "FutureWarning" not in err
    ours = [
        line for line in err.splitlines() if "Warning:" in line and "lora_dapt" in line.split("Warning:")[0]
    ]
    assert ours == []
    assert "gradient checkpointing on" in err  # the run did take the checkpointing path that used to warn


def test_quiet_prints_the_result_and_no_info(
    tiny_model_dir, domain_files, tmp_path, capsys, caplog, monkeypatch, lora_dapt_level
):
    cfg = _config(tmp_path, tiny_model_dir, domain_files)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # would get bars if -q did not turn them off
    caplog.set_level(logging.INFO)
    assert main(["-q", "train", str(cfg)]) == 0
    assert [
        r.getMessage() for r in caplog.records if r.name == "lora_dapt" and r.levelno < logging.WARNING
    ] == []
    assert terminal.getvalue() == ""
    out = capsys.readouterr().out
    assert '"steps": 4' in out and "general" in out  # the summary and the before -> after table
    assert lora_dapt_level.level == logging.NOTSET  # main put the level back


def test_progress_lines_off_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="lora_dapt")
    with progress(100, "work", unit="doc", every_s=None) as bar:
        for _ in range(100):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [re.sub(r", \d+s$", "", m) for m in lines] == [
        f"work: {n}/100 doc ({n}%)" for n in range(10, 101, 10)
    ]
    assert sys.stderr.getvalue() == ""
    caplog.clear()
    assert list(track([1, 2, 3], "few", every_fraction=None, every_s=None)) == [1, 2, 3]
    assert caplog.records == []  # no fraction, no interval: no lines


def test_progress_bar_on_a_terminal_and_nothing_when_quiet(caplog, monkeypatch, lora_dapt_level):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.set_level(logging.INFO, logger="lora_dapt")
    with Progress(5, "bar", every_s=None) as bar:
        bar.update(5)
    assert "\r" in terminal.getvalue() and "bar" in terminal.getvalue()
    assert caplog.records == []
    terminal.seek(0)
    terminal.truncate()
    lora_dapt_level.setLevel(logging.WARNING)  # what -q does
    with Progress(5, "bar", every_s=None) as bar:
        bar.update(5)
    assert terminal.getvalue() == ""


def test_foreign_bars_hidden_keeps_other_writes(monkeypatch):
    from tqdm import tqdm

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with foreign_bars_hidden():
        for _ in tqdm(range(3), desc="dequantizing"):  # a library's bar: writes '\r' redraws to sys.stderr
            pass
        sys.stderr.write("lib.py:1: UserWarning: kept\n")  # what a warning prints
    text = stream.getvalue()
    assert "\r" not in text and "dequantizing" not in text
    assert "lib.py:1: UserWarning: kept" in text
