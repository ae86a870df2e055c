"""A training run in its own process, for the kill / SIGINT / lock tests.

``python -m tests.reliability_worker MODEL_DIR OUT_DIR [RESUME] [options]``; :func:`train` is the same run
in this process (the tests' uninterrupted reference); :func:`start_worker`, :func:`finish` and
:func:`wait_rows` are the parent's side (every wait has a time limit, so a hang fails the test). Options:

* ``--save-every N``, ``--save-total-limit N``, ``--overwrite``: the TrainConfig keys;
* ``--crash-before-marker N``: die (``os._exit(CRASH_CODE)``, no cleanup, like a SIGKILL) once the Trainer
  has saved checkpoint-N and before lora_dapt marks it complete;
* ``--hold-at N --hold-file PATH``: once step N is logged, wait until PATH exists (up to 120 s), so another process
  can be started against a run that is certainly in progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from lora_dapt import AdapterConfig, EvalConfig, TrainConfig
from lora_dapt.data.packing import pack_documents
from lora_dapt.model.load import load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.rundir import RunDir
from lora_dapt.train.pretrain import TrainResult, continued_pretrain
from tests.conftest import make_text

MAX_STEPS = 16
CRASH_CODE = 77
"""The exit status of ``--crash-before-marker``."""
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# The parent's side
# ---------------------------------------------------------------------------------------------------------------


def start_worker(model_dir: Path, out: Path, resume: str = "", *options: str) -> subprocess.Popen:
    """Start the worker (``options``: the flags above)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability_worker", str(model_dir), str(out), resume, *options],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for ``proc``: (exit status, stdout, stderr). Past ``timeout`` it is killed and the test fails."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"worker still running after {timeout:.0f} s (killed): {stderr[-3000:]}"
        ) from None
    return proc.returncode, stdout, stderr


def train_rows(out: Path) -> list[dict[str, Any]]:
    """The train rows logged so far (a row being written is skipped)."""
    return [r for r in RunDir(out).read_metrics() if r.get("type") == "train"]


def wait_rows(proc: subprocess.Popen, out: Path, n: int, timeout: float = 180) -> None:
    """Wait until ``n`` train rows are logged, or ``proc`` exited; past ``timeout`` the test fails."""
    end = time.time() + timeout
    while proc.poll() is None:
        if len(train_rows(out)) >= n:
            return
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"worker logged {len(train_rows(out))} of {n} rows in {timeout:.0f} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------------------------


class HoldAt(TrainerCallback):
    """Once step ``step`` is logged, wait until ``release`` exists (at most ``timeout`` seconds)."""

    def __init__(self, step: int, release: Path, timeout: float = 120.0) -> None:
        self.step, self.release, self.timeout = step, release, timeout

    def on_log(self, args, state, control, logs=None, **kw):
        if state.global_step == self.step and logs and "loss" in logs:
            end = time.time() + self.timeout
            while not self.release.exists() and time.time() < end:
                time.sleep(0.05)
        return control


def crash_before_marker(step: int) -> None:
    """Make this process die right after the Trainer saved checkpoint-``step``, before its marker."""
    mark_complete = RunDir.mark_complete

    def crash_then_mark(run: RunDir, at: int, tokens: int) -> bool:
        if at == step:
            os._exit(CRASH_CODE)
        return mark_complete(run, at, tokens)

    RunDir.mark_complete = crash_then_mark  # this worker process only: the crash point of the test


def train(
    model_dir: str | Path,
    out_dir: str | Path,
    resume: str | None = None,
    *,
    save_every: int = 2,
    save_total_limit: int = 3,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """The worker's run: a QLoRA adapter with dropout (so the RNG state matters), ``MAX_STEPS`` steps."""
    model, tok = load_base_model(model_dir, quantization="nf4")
    torch.manual_seed(0)
    model = apply_lora(model, AdapterConfig(r=4, alpha=8, dropout=0.1, gradient_checkpointing=False))
    docs = [
        [tok.bos_token_id, *tok(make_text(25, s), add_special_tokens=False).input_ids, tok.eos_token_id]
        for s in range(40)
    ]
    ds = Dataset.from_list(pack_documents(docs, 32, tok.pad_token_id))
    cfg = TrainConfig(
        output_dir=str(out_dir),
        max_steps=MAX_STEPS,
        learning_rate=5e-3,
        batch_size=2,
        gradient_accumulation_steps=2,
        warmup_steps=2,
        save_every=save_every,
        save_total_limit=save_total_limit,
        resume_from=resume or None,
        overwrite=overwrite,
    )
    return continued_pretrain(model, tok, ds, cfg, eval_config=EvalConfig(enabled=False), callbacks=callbacks)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("resume", nargs="?", default="")
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--save-total-limit", type=int, default=3)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--crash-before-marker", type=int, default=None)
    p.add_argument("--hold-at", type=int, default=None)
    p.add_argument("--hold-file", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.crash_before_marker is not None:
        crash_before_marker(args.crash_before_marker)
    hold = [HoldAt(args.hold_at, args.hold_file)] if args.hold_at is not None else []
    result = train(
        args.model_dir,
        args.out_dir,
        args.resume,
        save_every=args.save_every,
        save_total_limit=args.save_total_limit,
        overwrite=args.overwrite,
        callbacks=hold,
    )
    print(json.dumps({"steps": result.steps, "stopped": result.stopped, "pid": os.getpid()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
