"""rundir (split from train)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import TrainingError

log = logging.getLogger("lora_dapt")

COMPLETE_MARKER = "lora_dapt_complete.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first (complete or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("checkpoint-*"):
        try:
            found.append((int(p.name.rsplit("-", 1)[1]), p))
        except ValueError:
            continue
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete and readable."""
    if not (ckpt / COMPLETE_MARKER).is_file():
        return "no completion marker (the save was interrupted)"
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({e})"
    weights = ckpt / "adapter_model.safetensors"
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            return f"adapter weights corrupt ({type(e).__name__}: {e})"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (ckpt / name).is_file() or (ckpt / name).stat().st_size == 0:
            return f"{name} missing or empty"
    return None


def find_resume_checkpoint(run_dir: Path, resume_from: str) -> Path | None:
    """Resolve ``resume_from`` ('latest' or a path). 'latest' skips incomplete/corrupt checkpoints with a
    warning; None when there is nothing to resume (a fresh start)."""
    if resume_from != "latest":
        p = Path(resume_from)
        problem = checkpoint_problem(p) if p.is_dir() else "not a directory"
        if problem:
            raise TrainingError(
                f"cannot resume from {p}: {problem}. Use resume_from='latest' to pick the newest good one"
            )
        return p
    for ckpt in checkpoint_dirs(run_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop train/eval rows logged after ``step`` (they were written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row cut by a crash
        if row.get("phase") == "before" or int(row.get("step", 0)) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def check_disk_space(path: Path, needed_bytes: int, what: str) -> None:
    """Raise a clear error when the file system of ``path`` has less than ``needed_bytes`` free."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise TrainingError(
            f"not enough disk space for {what} in {path}: {free / 2**20:.0f} MiB free, about "
            f"{needed_bytes / 2**20:.0f} MiB needed. Free some space or point output_dir elsewhere."
        )
