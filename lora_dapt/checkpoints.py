"""Checkpoints of a run, and the lock that keeps a second process out of its directory.

:class:`~lora_dapt.rundir.RunDir` is the API; these functions work on plain paths (the Trainer's callback
and the tests call them through RunDir). The crash-safety contract:

* **The marker comes last.** The Trainer writes ``checkpoint-N/``; then :func:`write_marker` reads every
  file of it back, fsyncs it, and records its size and sha256 in ``lora_dapt_complete.json`` (written
  through a temporary file, fsynced, renamed). A checkpoint without that marker does not count.
* **Rotation comes after the marker** (:func:`rotate_checkpoints`; the Trainer's own ``save_total_limit``
  is off), so a kill at any moment leaves the previous complete checkpoint on disk.
* **Nothing is loaded before it is checked** (:func:`checkpoint_problem`): every file the marker lists must
  have its recorded size and checksum; the files the Trainer ``torch.load``s must load with
  ``weights_only=True`` (a pickle payload is refused, never run); ``trainer_state.json`` must be a JSON
  object with the checkpoint's ``global_step``; the adapter weights must be safetensors. A checkpoint
  that fails is skipped with a warning naming the file and the problem.
* **Nothing is deleted to make room for a fresh start unasked** (:func:`start_run`): a directory holding a
  run is refused without ``train.overwrite`` or ``train.resume_from``, and 'latest' that finds no usable
  checkpoint in one is refused, naming each checkpoint and why.
* **One run per directory** (:class:`RunLock`): an flock held for the whole run.

What this cannot promise: a disk or file system that acknowledges an fsync without writing the data; and a
checksum taken at save time proves the files are unchanged since, not that the save itself was right.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import TrainingError

if TYPE_CHECKING:
    from .rundir import RunDir

log = logging.getLogger("lora_dapt")

COMPLETE_MARKER = "lora_dapt_complete.json"
"""Written into a checkpoint after every file of it is on disk; a checkpoint without it does not count."""
LOCK_FILE = "lora_dapt.lock"
"""The run directory's lock file: flock'ed by the run that owns the directory, holding that run's PID."""

_TORCH_FILES = ("optimizer.pt", "scheduler.pt")
"""Files the Trainer torch.loads on resume (besides the RNG state and the optional ``scaler.pt``)."""
_JSON_FILES = ("trainer_state.json", "adapter_config.json")
_PICKLE_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin")
"""Weights in a pickle: loading them could run code, so a checkpoint holding one is refused."""
_WEIGHTS = "adapter_model.safetensors"
_CHUNK = 1 << 20
_MAX_DETAIL = 200
"""An error message quoted in a reason is cut to this many characters."""


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from (:meth:`RunDir.start`), and how far that run had got."""

    checkpoint: Path
    step: int
    """Optimizer steps done (the Trainer's ``global_step``)."""
    tokens: int
    """Tokens trained so far (the Trainer's ``num_input_tokens_seen``)."""

    def adapter_weights(self) -> dict[str, Any]:
        """The adapter tensors saved in the checkpoint (for a run whose every step is already done)."""
        from safetensors.torch import load_file

        return load_file(str(self.checkpoint / _WEIGHTS))


try:  # the lock uses flock(2); without fcntl (Windows) runs are not locked, and RunLock says so
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_step(ckpt: Path) -> int | None:
    """N of a ``checkpoint-N`` directory; None for any other name."""
    try:
        return int(Path(ckpt).name.rsplit("-", 1)[1]) if Path(ckpt).name.startswith("checkpoint-") else None
    except ValueError:
        return None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first (complete or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.glob("checkpoint-*") if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)[::-1]]


# ---------------------------------------------------------------------------------------------------------------
# The completion marker
# ---------------------------------------------------------------------------------------------------------------


def _hash(path: Path, *, sync: bool = False) -> dict[str, Any]:
    """Size and sha256 of ``path``; ``sync``: fsync it too (the Trainer does not sync what it writes)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def _sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened and synced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_durable(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, an fsync and a rename (then sync the
    directory, so the rename itself is on disk)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(
        p
        for p in ckpt.rglob("*")
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.endswith(".tmp")
    )


def write_marker(ckpt: Path, step: int, tokens: int) -> None:
    """Mark ``ckpt`` complete: every file's size and sha256 (each fsynced first), then the marker."""
    files = {p.relative_to(ckpt).as_posix(): _hash(p, sync=True) for p in _checkpoint_files(ckpt)}
    _sync_dir(ckpt)
    write_json_durable(ckpt / COMPLETE_MARKER, {"step": step, "tokens": tokens, "files": files})


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _detail(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_marker(ckpt: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the marker, None), or (None, why it is unusable)."""
    path = ckpt / COMPLETE_MARKER
    if not path.is_file():
        return None, f"no completion marker ({COMPLETE_MARKER} missing: the save was interrupted)"
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{COMPLETE_MARKER} unreadable ({_detail(e)})"
    if not isinstance(marker, dict):
        return None, f"{COMPLETE_MARKER} is not a JSON object"
    files = marker.get("files")
    if files is not None and not (
        isinstance(files, dict)
        and all(isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values())
    ):
        return None, f"{COMPLETE_MARKER}: its file list is malformed"
    return marker, None


def _checksum_problem(ckpt: Path, files: dict[str, dict[str, Any]]) -> str | None:
    for name, want in sorted(files.items()):
        path = ckpt / name
        if not path.is_file():
            return f"{name} missing (listed in {COMPLETE_MARKER})"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, {want['size']} when saved (truncated or replaced)"
        if _hash(path)["sha256"] != want.get("sha256"):
            return f"{name} checksum differs from the one recorded when it was saved (corrupt)"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{path.name} unreadable ({_detail(e)})"
    return None if isinstance(data, dict) else f"{path.name} is not a JSON object"


def _trainer_state_problem(ckpt: Path, marker: dict[str, Any]) -> str | None:
    path = ckpt / "trainer_state.json"
    problem = _json_problem(path)
    if problem:
        return problem
    step = json.loads(path.read_text(encoding="utf-8")).get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"trainer_state.json has no global_step (found {str(step)[:_MAX_DETAIL]!r})"
    expected = {checkpoint_step(ckpt), marker.get("step")} - {None}
    if expected and expected != {step}:
        return f"trainer_state.json says global_step {step}, the checkpoint is {ckpt.name}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        return f"{path.name} corrupt ({_detail(e)})"
    return None


def _torch_load_problem(path: Path) -> str | None:
    """Load ``path`` as the Trainer does, ``weights_only=True``: a pickle that would import or call anything
    but tensors and plain containers is refused by torch's restricted unpickler, never run."""
    import torch
    from transformers.trainer_pt_utils import safe_globals  # the numpy types of the RNG state, nothing more

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types here (UnpicklingError, RuntimeError, EOFError, ...)
        return f"{path.name} cannot be loaded safely ({_detail(e)})"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when every file a resume loads is sound.

    Checked in this order: the marker (present, readable); no pickled weights; each file the marker lists
    against its recorded size and sha256 (markers written before checksums were recorded have no list:
    those checkpoints get the other checks only); the files the resume loads are present; then each one is
    opened the way the resume will: trainer_state.json and adapter_config.json as JSON objects (with the
    right global_step), the adapter's safetensors header, and every ``torch.load``ed file with
    ``weights_only=True``.
    """
    ckpt = Path(ckpt)
    marker, problem = _read_marker(ckpt)
    if marker is None:
        return problem
    for name in _PICKLE_WEIGHTS:
        if (ckpt / name).exists():
            return (
                f"{name} is a pickle (loading it could run code); a checkpoint's weights must be safetensors"
            )
    files = marker.get("files")
    if files is None:
        log.info("%s was saved without checksums (an older lora_dapt): its files are not verified", ckpt)
    elif problem := _checksum_problem(ckpt, files):
        return problem
    rng = sorted(ckpt.glob("rng_state*.pth"))
    torch_files = [ckpt / n for n in _TORCH_FILES] + rng + [p for p in [ckpt / "scaler.pt"] if p.exists()]
    for path in [ckpt / _WEIGHTS, *(ckpt / n for n in _JSON_FILES), *torch_files]:
        if not path.is_file():
            return f"{path.name} missing"
        if path.stat().st_size == 0:
            return f"{path.name} is empty"
    if not rng:
        return "rng_state.pth missing"
    checks = [
        _trainer_state_problem(ckpt, marker),
        _json_problem(ckpt / "adapter_config.json"),
        _safetensors_problem(ckpt / _WEIGHTS),
    ]
    for problem in checks:
        if problem:
            return problem
    for path in torch_files:
        if problem := _torch_load_problem(path):
            return problem
    return None


def scan_checkpoints(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest usable checkpoint (None: none), and why each newer one was skipped (warned as well)."""
    skipped = []
    for ckpt in checkpoint_dirs(run_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
        skipped.append((ckpt, problem))
    return None, skipped


def find_resume_checkpoint(run_dir: Path, resume_from: str) -> Path | None:
    """Resolve ``resume_from`` ('latest' or a path). 'latest' skips unusable checkpoints with a warning
    (None when no checkpoint is usable); a path that is not a usable checkpoint is a TrainingError."""
    if resume_from != "latest":
        p = Path(resume_from)
        problem = checkpoint_problem(p) if p.is_dir() else "not a directory"
        if problem:
            raise TrainingError(
                f"cannot resume from {p}: {problem}. Use resume_from='latest' to pick the newest good one"
            )
        return p
    return scan_checkpoints(run_dir)[0]


# ---------------------------------------------------------------------------------------------------------------
# Starting a run: resume, fresh start, refusals
# ---------------------------------------------------------------------------------------------------------------


def start_run(
    run: RunDir,
    resume_from: str | None,
    *,
    overwrite: bool,
    before_resume: Callable[[Resume], None] | None = None,
) -> Resume | None:
    """What :meth:`RunDir.start` does once the directory is locked (see there): the checkpoint to resume from,
    or None for a fresh start; a TrainingError for what must be refused."""
    skipped: list[tuple[Path, str]] = []
    if resume_from == "latest":
        ckpt, skipped = scan_checkpoints(run.path)
    else:
        ckpt = find_resume_checkpoint(run.path, resume_from) if resume_from else None
    if ckpt is not None:
        return _resume(run, ckpt, before_resume)
    found = run.previous_run()
    if found and not overwrite:
        if resume_from:
            raise TrainingError(_nothing_to_resume(run.path, found, skipped))
        raise TrainingError(
            f"{run.path} holds an earlier run ({'; '.join(found)}). Continue it with "
            "train.resume_from=latest, or start over with train.overwrite=true (deletes that run's "
            "checkpoints, metrics log and adapter), or choose another train.output_dir"
        )
    if found:
        log.warning(
            "train.overwrite: starting a fresh run in %s, deleting the earlier run's files (%s)",
            run.path,
            "; ".join(found),
        )
        run.clear_previous_run()
    return None


def _resume(run: RunDir, ckpt: Path, before_resume: Callable[[Resume], None] | None) -> Resume:
    """Resume from ``ckpt``: delete the checkpoints saved after it and cut the metrics log back to its step
    (both belong to the session being replaced), so no step appears twice and no two sessions mix.
    ``before_resume`` may refuse first (by raising), when nothing is changed yet."""
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    resume = Resume(ckpt, int(state["global_step"]), int(state.get("num_input_tokens_seen", 0)))
    if before_resume is not None:
        before_resume(resume)
    later = [p for p in run.checkpoints() if (checkpoint_step(p) or 0) > resume.step]
    if later:
        log.warning(
            "deleting %s: saved after step %d, the checkpoint this run resumes from (like the metrics rows "
            "after it, they belong to the session being replaced)",
            ", ".join(p.name for p in later),
            resume.step,
        )
        for p in later:
            shutil.rmtree(p, ignore_errors=True)
    run.truncate_metrics(resume.step)
    log.info("resuming from %s (step %d)", ckpt, resume.step)
    return resume


def _nothing_to_resume(path: Path, found: list[str], skipped: list[tuple[Path, str]]) -> str:
    """The refusal of resume_from='latest' in a directory holding a run without a usable checkpoint."""
    why = "; ".join(f"{p.name}: {problem}" for p, problem in skipped[:5])
    if len(skipped) > 5:
        why += f"; and {len(skipped) - 5} more"
    unusable = (
        f"Unusable: {why}. " if why else "It has no checkpoint (train.save_every = 0 saves only at the end). "
    )
    return (
        f"train.resume_from='latest' found no usable checkpoint in {path}, which holds a run "
        f"({'; '.join(found)}); nothing was deleted. {unusable}Resume from a checkpoint you trust with "
        "train.resume_from=PATH, or start over with train.overwrite=true (deletes that run's checkpoints and "
        "metrics log)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------------------------


def rotate_checkpoints(run_dir: Path, newest: int, keep: int, protect: Path | None = None) -> list[Path]:
    """After checkpoint ``newest`` is marked: keep the ``keep`` newest complete (marked) checkpoints up to
    that step and ``protect`` (the one this session resumed from); delete the other ones up to that step,
    complete or not. Returns the deleted directories."""
    deleted, kept = [], 0
    for ckpt in checkpoint_dirs(run_dir):
        step = checkpoint_step(ckpt)
        if step is None or step > newest or (protect is not None and ckpt == Path(protect)):
            continue
        if kept < keep and (ckpt / COMPLETE_MARKER).is_file():
            kept += 1
            continue
        shutil.rmtree(ckpt, ignore_errors=True)
        deleted.append(ckpt)
    return deleted


# ---------------------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/lora_dapt.lock``, which holds the owner's PID.

    The kernel drops a flock when its process dies, so the file a killed run leaves behind blocks no one;
    the file is never deleted (deleting a lock file races with a process that has just opened it). The
    lock lives in an open file: one dropped without :meth:`release` is released when it is collected.
    """

    def __init__(self, path: Path, file: BinaryIO | None) -> None:
        self.path = path
        self._file = file

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock ``run_dir``; a TrainingError naming the holder's PID when another process has it."""
        path = Path(run_dir) / LOCK_FILE
        if fcntl is None:  # pragma: no cover - Windows
            log.warning("no fcntl here: %s is not locked against a second run", run_dir)
            return cls(path, None)
        file = path.open("a+b")  # created if missing, never truncated before the lock is ours
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(file.fileno())
            file.close()
            raise TrainingError(
                f"{run_dir} is in use by another training run (PID {holder or 'unknown'}, which holds the "
                f"lock {path}). Wait for it to finish or stop it, or train into another train.output_dir"
            ) from None
        except OSError as e:  # a file system without flock (some NFS mounts)
            file.close()
            log.warning("could not lock %s (%s): a second run into this directory is not stopped", path, e)
            return cls(path, None)
        os.ftruncate(file.fileno(), 0)
        os.pwrite(file.fileno(), f"{os.getpid()}\n".encode(), 0)
        return cls(path, file)

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        """Unlock (the file stays, emptied, so it names no one); a no-op when not held."""
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            os.ftruncate(file.fileno(), 0)
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        finally:
            file.close()


def _read_pid(fd: int) -> int | None:
    """The PID the holder wrote into the lock file (it may not have written it yet: retry briefly)."""
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None
