"""Exit codes of `lora-dapt train`: 0 finished, 2 an error (a NaN stop too), 3 the forgetting budget, 130 after
SIGINT, 143 after SIGTERM; and signals during the evaluations before / after training leave a clean state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lora_dapt.cli.main import EXIT_CODES, build_parser, main
from lora_dapt.rundir import RunDir, find_resume_checkpoint

from .conftest import make_text

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 60


def _config(tmp_path: Path, model_dir: Path, domain_files: list[Path], **train) -> Path:
    general = tmp_path / "general.txt"
    general.write_text(" ".join(make_text(40, s) for s in range(300, 304)))
    cfg = {
        "model": {"name_or_path": str(model_dir), "quantization": "nf4"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "gradient_checkpointing": False},
        "data": {
            "sources": [str(p) for p in domain_files],
            "seq_len": 32,
            "eval_fraction": 0.25,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": MAX_STEPS,
            "learning_rate": 5e-3,
            "batch_size": 1,
            "gradient_accumulation_steps": 1,
            "save_every": 4,
            **train,
        },
        "eval": {"general_sources": [str(general)], "max_eval_tokens": 128},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in RunDir(run).read_metrics() if r["type"] == "train"]


def _signal_mid_training(cfg: Path, run: Path, sig: int) -> tuple[int, str]:
    """Start `lora-dapt train CFG` in a subprocess, send ``sig`` once 3 steps are logged; (exit code, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_dapt.cli", "train", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.time() + 180
        while time.time() < end and proc.poll() is None and len(_train_steps(run)) < 3:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_training_exits_128_plus_its_number_and_resumes(
    tiny_model_dir, domain_files, tmp_path, sig, code
):
    cfg = _config(tmp_path, tiny_model_dir, domain_files)
    run = tmp_path / "run"
    returncode, stderr = _signal_mid_training(cfg, run, sig)
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "resume_from='latest'" in stderr
    summary = json.loads((run / "summary.json").read_text())
    name = signal.Signals(sig).name
    assert summary["stopped"] == f"interrupted by {name}" and summary["signal"] == name
    stopped_at = summary["steps"]
    assert 3 <= stopped_at < MAX_STEPS
    assert find_resume_checkpoint(run, "latest") == run / "checkpoints" / f"checkpoint-{stopped_at}"
    if sig == signal.SIGTERM:  # the checkpoint resumes to the end
        assert main(["train", str(cfg), "--set", "train.resume_from=latest"]) == 0
        assert _train_steps(run) == list(range(1, MAX_STEPS + 1))
        assert json.loads((run / "summary.json").read_text())["signal"] is None


class _SignalDuring:
    """Wraps evaluate_splits: sends ``sig`` to this process ``times`` times as the evaluation of ``phase``
    starts (the first signal is only noted, so the evaluation then runs under it). Only its first call in that
    phase signals: a QLoRA run's evaluation scores the 4-bit base and then the original 16-bit one."""

    def __init__(self, real, phase: str, sig: int = signal.SIGTERM, times: int = 1) -> None:
        self.real, self.phase, self.sig, self.times = real, phase, sig, times
        self.fired = False

    def __call__(self, *args, **kw):
        if kw["phase"] == self.phase and not self.fired:
            self.fired = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)  # handled at once, in this (main) thread
        return self.real(*args, **kw)


@pytest.fixture()
def no_default_sigterm(monkeypatch):
    """A SIGTERM that reaches no handler of ours fails the test instead of killing pytest."""

    def fail(signum, frame):
        raise AssertionError("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, fail)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_the_evaluation_before_training(
    tiny_model_dir, domain_files, tmp_path, monkeypatch, capsys, caplog, no_default_sigterm
):
    import lora_dapt.train.evaluation as evaluation

    cfg = _config(tmp_path, tiny_model_dir, domain_files)
    run = tmp_path / "run"
    monkeypatch.setattr(evaluation, "evaluate_splits", _SignalDuring(evaluation.evaluate_splits, "before"))
    with caplog.at_level("WARNING", logger="lora_dapt"):
        assert main(["train", str(cfg)]) == 143
    assert "SIGTERM received: finishing the evaluation before training, then stopping" in caplog.text
    assert (
        "interrupted by SIGTERM during the evaluation before training: stopped before training; nothing was "
        "trained; run the same command again to start the run" in caplog.text
    )
    out = json.loads(capsys.readouterr().out)  # the result, printed as by a finished run
    assert out["steps"] == 0 and out["signal"] == "SIGTERM"
    assert out["stopped"] == "interrupted by SIGTERM during the evaluation before training"
    # a clean state: no run here (no log, checkpoint, adapter, summary), no temporary file left
    assert not RunDir(run).has_previous_run()
    assert not list(run.rglob("*.tmp"))
    assert sorted(p.name for p in run.iterdir()) == sorted(
        n for n in ("config.yaml", "run_info.json", "eval_texts.json", "lora_dapt.lock") if (run / n).exists()
    )
    # the same command (and a resume) then runs to the end
    monkeypatch.undo()
    assert main(["train", str(cfg), "--set", "train.resume_from=latest"]) == 0
    assert _train_steps(run) == list(range(1, MAX_STEPS + 1))
    phases = [r["phase"] for r in RunDir(run).read_metrics() if r["type"] == "eval"]
    assert phases == ["before", "before", "after", "after"]


def test_a_second_sigterm_during_the_evaluation_before_aborts_cleanly(
    tiny_model_dir, domain_files, tmp_path, monkeypatch, capsys, no_default_sigterm
):
    import lora_dapt.train.evaluation as evaluation

    cfg = _config(tmp_path, tiny_model_dir, domain_files)
    run = tmp_path / "run"
    monkeypatch.setattr(
        evaluation, "evaluate_splits", _SignalDuring(evaluation.evaluate_splits, "before", times=2)
    )
    assert main(["train", str(cfg)]) == 143
    err = capsys.readouterr().err
    assert "lora-dapt train: interrupted by SIGTERM (resume with --set train.resume_from=latest)" in err
    assert not RunDir(run).has_previous_run() and not (run / "eval_before.json").exists()
    monkeypatch.undo()
    assert main(["train", str(cfg)]) == 0  # nothing to refuse: the directory holds no run
    assert _train_steps(run) == list(range(1, MAX_STEPS + 1))


def test_sigterm_during_the_evaluation_after_training_finishes_it(
    tiny_model_dir, domain_files, tmp_path, monkeypatch, capsys, caplog, no_default_sigterm
):
    import lora_dapt.train.evaluation as evaluation

    cfg = _config(tmp_path, tiny_model_dir, domain_files, max_steps=8)
    run = tmp_path / "run"
    monkeypatch.setattr(evaluation, "evaluate_splits", _SignalDuring(evaluation.evaluate_splits, "after"))
    with caplog.at_level("WARNING", logger="lora_dapt"):
        assert main(["train", str(cfg), "--set", "merge.enabled=true"]) == 143
    assert "SIGTERM received during the evaluation after training: finished it; the run is complete" in (
        caplog.text
    )
    summary = RunDir(run).read_summary()
    assert summary["stopped"] is None and summary["signal"] == "SIGTERM" and summary["steps"] == 8
    assert set(summary["after"]) == {"domain", "general", "original_16bit"}  # the evaluation finished
    assert set(summary["after"]["original_16bit"]) >= {"domain", "general"}
    assert (run / "report.md").is_file() and not (run / "merged").exists()  # no merge after a signal
    assert not list(run.rglob("*.tmp"))


def test_forgetting_budget_and_nan_stops_exit_non_zero(tiny_model_dir, tmp_path, capsys):
    domain = tmp_path / "domain"
    domain.mkdir()
    for i in range(4):  # one sentence, hard: general text gets worse at once
        (domain / f"{i}.txt").write_text((make_text(20, seed=3) + " ") * 8 + f"copy {i}.")
    cfg = _config(
        tmp_path,
        tiny_model_dir,
        [domain],
        max_steps=40,
        learning_rate=3e-2,
        batch_size=4,
        eval_every=2,
        scheduler="constant",
        save_every=0,
    )
    budget = ["--set", "eval.max_general_ppl_increase=0.01", "--set", "data.eval_fraction=0.0"]
    assert main(["train", str(cfg), *budget]) == EXIT_CODES["forgetting budget"] == 3
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary["stopped"].startswith("forgetting budget exceeded at step") and summary["signal"] is None
    capsys.readouterr()
    nan = ["--set", "train.learning_rate=1e30", "--set", "train.max_grad_norm=null"]
    nan += ["--set", "train.overwrite=true", "--set", "eval.enabled=false"]
    assert main(["train", str(cfg), *nan]) == EXIT_CODES["error"] == 2
    err = capsys.readouterr().err
    assert "error: non-finite loss at step 2" in err and "Traceback" not in err


def test_help_documents_the_exit_codes(capsys):
    for argv in (["--help"], ["train", "--help"], ["sft", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        text = capsys.readouterr().out
        assert "exit status of `train` and `sft`:" in text
        for code in ("0 ", "2 ", "3 ", "130", "143"):
            assert f"\n  {code}" in text, (argv, code)
