"""The run directory, and its one owner: :class:`RunDir`.

Every file of a run is read and written here, and nowhere else opens them by name (as the HF Trainer owns
``trainer_state.json``). Stages hand each other values in memory; a run is read back from disk only by the
from-disk entry points (``merge_run``, ``sft`` on a run directory, ``lora-dapt report/merge/eval``)::

    RUN_DIR/
      config.yaml             the resolved RunConfig (every default filled in)
      run_info.json           where the base model came from (a ModelSource) and the lora_dapt version
      metrics.jsonl           one JSON row per line: train rows and eval rows (TrainRow, EvalRow)
      eval_before.json        the evaluation before training (a resume reuses it)
      eval_texts.json         up to 256 held-out documents (merge verification, `lora-dapt eval`)
      summary.json            the TrainResult, plus the corpus stats
      trackers.json           train.report_to's runs (W&B / MLflow ids): a resume and the merge continue them
      checkpoints/checkpoint-N/   Trainer checkpoints; one counts only once lora_dapt_complete.json (each
                              file's size and sha256) is in it and every file matches (checkpoints.py)
      lora_dapt.lock          flock'ed by the run training here (it holds that run's PID)
      adapter/                the final adapter and its tokenizer
      report.md, plots/       the report (evaluate.report)
      merged/                 the merged 16-bit model (export.merge)
      tune/                   `lora-dapt tune`'s trials and choice (train.tune_dir.TuneDir owns it)

Writes of JSON files go to a temporary file first and are renamed over the old one, so a crash leaves the
old or the new file, never half of one. The metrics log is appended line by line; a line cut short by a
crash is skipped (with a warning) when it is read back. One run at a time: :meth:`RunDir.start` takes the
directory's lock and :meth:`RunDir.close` (or leaving ``with RunDir(...) as run:``) releases it.

Several processes (torchrun / accelerate launch): rank 0 alone writes. On the other ranks every write
method here does nothing, and :meth:`RunDir.start` runs on rank 0 (the lock, the checkpoint choice) while
they wait, then hands them its result (:func:`~lora_dapt.train.distributed.run_on_main`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .checkpoints import (
    COMPLETE_MARKER,
    Resume,
    RunLock,
    checkpoint_dirs,
    checkpoint_problem,
    find_resume_checkpoint,
    rotate_checkpoints,
    start_run,
    write_marker,
)
from .errors import RunDirError, TrainingError
from .train.distributed import is_main, run_on_main

if TYPE_CHECKING:
    from .config import RunConfig
    from .model.load import ModelSource

log = logging.getLogger("lora_dapt")
_Section = TypeVar("_Section")

__all__ = [  # the checkpoint functions live in checkpoints.py; RunDir is how the rest of lora_dapt uses them
    "COMPLETE_MARKER",
    "EVAL_TEXTS_KEPT",
    "MERGE_REPORT",
    "EvalRow",
    "Resume",
    "RunDir",
    "TrainRow",
    "check_disk_space",
    "checkpoint_dirs",
    "checkpoint_problem",
    "find_resume_checkpoint",
    "write_json_atomic",
]
MERGE_REPORT = "merge_report.json"
"""The verification report export.merge writes into every merged model directory."""
EVAL_TEXTS_KEPT = 256
"""Held-out documents kept in ``eval_texts.json``."""


# ---------------------------------------------------------------------------------------------------------------
# Typed rows of the metrics log
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainRow:
    """One ``{"type": "train"}`` row of ``metrics.jsonl``: the state after optimizer step ``step``."""

    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    """Tokens trained so far (targets the loss was computed on)."""
    tokens_per_s: float
    elapsed_s: float
    type: str = "train"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {"type": out.pop("type"), **out}


@dataclass
class EvalRow:
    """One ``{"type": "eval"}`` row: an evaluation of one split at one step.

    ``tokens`` is the number of tokens trained so far (the x axis of the plots), ``eval_tokens`` the number
    of tokens scored; ``result`` is an ``EvalResult.to_dict()`` (loss, ppl, bits_per_byte, ...).
    """

    step: int
    phase: str
    """'before', 'during' or 'after'."""
    split: str
    """'domain' or 'general'."""
    result: dict[str, Any]
    tokens: int = 0
    type: str = "eval"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "step": self.step,
            "phase": self.phase,
            "split": self.split,
            **self.result,
            "eval_tokens": self.result.get("tokens"),
            "tokens": self.tokens,
        }


# ---------------------------------------------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
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


def _read_json(path: Path) -> Any | None:
    """The JSON in ``path``; None when it does not exist; RunDirError when it cannot be read."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------------
# RunDir
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunDir:
    """A run directory: its layout, and every read and write of its files.

    ``RunDir(path)`` names a directory that may not exist yet (training creates it with :meth:`create`);
    :meth:`open` is for reading a run back and refuses a path that is not a directory.

    Training holds the directory's lock from :meth:`start` to :meth:`close`; use it as a context manager so
    the lock goes with the run, whatever way the run ends.

    Example::

        run = RunDir.open("runs/demo")
        rows = [r for r in run.read_metrics() if r["type"] == "train"]
        source = run.read_run_info()        # a ModelSource: what the adapter was trained on

        with RunDir("runs/demo") as run:
            resume = run.start("latest")    # locked until the block is left
    """

    path: Path
    _lock: RunLock | None = field(default=None, init=False, repr=False, compare=False)
    _resumed_from: Path | None = field(default=None, init=False, repr=False, compare=False)
    """The checkpoint this session resumed from: rotation never deletes it."""

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the directory's lock (taken by :meth:`start`); a no-op when not held."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory; :class:`RunDirError` when ``path`` is not a directory."""
        run = cls(Path(path))
        if not run.path.is_dir():
            raise RunDirError(
                f"run directory not found: {run.path} (give the train.output_dir of a run, the folder holding "
                "metrics.jsonl and config.yaml)"
            )
        return run

    def create(self) -> RunDir:
        """Make the directory (and its parents) if needed; returns self."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """True for a finished training run directory (DAPT or SFT): it holds ``adapter/adapter_config.json``."""
        return (Path(path) / "adapter" / "adapter_config.json").is_file()

    @staticmethod
    def run_of_adapter(path: str | Path) -> Path | None:
        """The run directory when ``path`` is the ``adapter/`` folder of a run (a common slip: the run is what
        merge and SFT want); else None."""
        p = Path(path)
        if (p / "adapter_config.json").is_file() and RunDir.is_run(p.parent):
            return p.parent
        return None

    # -- layout --------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def run_info_path(self) -> Path:
        return self.path / "run_info.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def eval_texts_path(self) -> Path:
        return self.path / "eval_texts.json"

    @property
    def eval_before_path(self) -> Path:
        return self.path / "eval_before.json"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def trackers_path(self) -> Path:
        return self.path / "trackers.json"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard event files (train.report_to: tensorboard): the Trainer's and lora_dapt's rows."""
        return self.path / "tensorboard"

    @property
    def tune_dir(self) -> Path:
        """Where ``lora-dapt tune`` writes by default (:class:`~lora_dapt.train.tune_dir.TuneDir`); not part
        of a run (``train.overwrite`` leaves it)."""
        return self.path / "tune"

    def read_merge_report(self) -> dict[str, Any] | None:
        """``merged/merge_report.json`` of this run; None when the run has not been merged."""
        data = _read_json(self.merged_dir / MERGE_REPORT)
        return data if isinstance(data, dict) else None

    def has_current_merge(self) -> bool:
        """True when ``merged/`` holds a merge that verified and is not older than the adapter's weights (so
        it can be reused); an unreadable report counts as no merge."""
        try:
            passed = (self.read_merge_report() or {}).get("passed") is True
        except RunDirError:
            return False
        if not passed or not (self.merged_dir / "config.json").is_file():
            return False
        weights, report = self.adapter_dir / "adapter_model.safetensors", self.merged_dir / MERGE_REPORT
        return not weights.is_file() or weights.stat().st_mtime <= report.stat().st_mtime

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    def has_adapter_tokenizer(self) -> bool:
        """True when ``adapter/`` holds the tokenizer training saved (every run since the first version does)."""
        from .model.tokenizer import has_tokenizer_files

        return has_tokenizer_files(self.adapter_dir)

    # -- config --------------------------------------------------------------------------------------------
    def write_config(self, config: RunConfig | dict[str, Any]) -> None:
        """Save the resolved configuration as ``config.yaml``: a RunConfig, or a mapping of sections."""
        if not is_main():
            return
        import yaml

        if isinstance(config, dict):
            text = yaml.safe_dump(config, sort_keys=False)
        else:
            text = config.to_yaml()
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.config_path)

    def read_config(self) -> dict[str, Any] | None:
        """The raw mapping of sections in ``config.yaml``; None when there is none; RunDirError when it is not
        a YAML mapping."""
        import yaml

        if not self.config_path.is_file():
            return None
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RunDirError(f"{self.config_path} is not valid YAML: {e}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise RunDirError(
                f"{self.config_path}: expected a mapping of sections, got {type(data).__name__}"
            )
        return data

    def read_section(self, name: str, cls: type[_Section]) -> _Section:
        """One section of ``config.yaml`` as its config class (``cls.from_dict``; defaults when absent), so a
        wrong key or value is an error, not a silent default."""
        data = self.read_config() or {}
        return cls.from_dict(data.get(name) or {})

    # -- run info: where the base model came from ----------------------------------------------------------
    def write_run_info(self, source: ModelSource | None) -> None:
        """``run_info.json``: the base model the adapter is trained on (None: unknown) and our version."""
        if not is_main():
            return
        from . import __version__

        write_json_atomic(
            self.run_info_path,
            {"base_model": source.to_dict() if source is not None else {}, "lora_dapt_version": __version__},
        )

    def read_run_info(self) -> ModelSource | None:
        """The :class:`~lora_dapt.model.load.ModelSource` recorded by training; None when the run recorded none."""
        from .model.load import ModelSource

        info = _read_json(self.run_info_path)
        if info is None:
            return None
        if not isinstance(info, dict):
            raise RunDirError(f"{self.run_info_path}: expected a JSON object")
        base = info.get("base_model") or {}
        if not isinstance(base, dict) or not base.get("name_or_path"):
            return None
        return ModelSource.from_dict(base)

    # -- trackers: the experiment-tracker runs of train.report_to ----------------------------------------------
    def write_trackers(self, info: dict[str, Any]) -> None:
        """``trackers.json``: the tracker names, run name and each tracker's run id (train.trackers.Trackers)."""
        if not is_main():
            return
        write_json_atomic(self.trackers_path, info)

    def read_trackers(self) -> dict[str, Any] | None:
        """``trackers.json``; None when the run recorded no tracker."""
        data = _read_json(self.trackers_path)
        if data is not None and not isinstance(data, dict):
            raise RunDirError(f"{self.trackers_path}: expected a JSON object")
        return data

    # -- metrics log ---------------------------------------------------------------------------------------
    def append_metric(self, row: TrainRow | EvalRow | dict[str, Any]) -> None:
        """Append one row to ``metrics.jsonl`` (flushed, so a crash loses at most the row being written)."""
        if not is_main():
            return
        data = row if isinstance(row, dict) else row.to_dict()
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(data) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` in order; [] when it does not exist.

        A last line that is not valid JSON (a crash in the middle of a write) is skipped with a warning; so is
        any other malformed line, naming its number.
        """
        path = self.metrics_path
        if not path.is_file():
            return []
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == last:
                    log.warning("%s: last line is cut short (a crash while writing?); skipped it", path)
                else:
                    log.warning("%s: line %d is not valid JSON; skipped it", path, i + 1)
                continue
            if not isinstance(row, dict):
                log.warning("%s: line %d is not a JSON object; skipped it", path, i + 1)
                continue
            rows.append(row)
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop the rows logged after ``step`` (written after the checkpoint a resume starts from) and the
        'after' evaluation of an earlier session (the run goes on, so that was not its end); the 'before'
        evaluation rows stay."""
        path = self.metrics_path
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a row cut by a crash
            if not isinstance(row, dict):
                continue
            phase = row.get("phase")
            if phase == "before" or (phase != "after" and int(row.get("step", 0)) <= step):
                keep.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, path)

    # -- evaluations, held-out texts, summary --------------------------------------------------------------
    def write_eval_before(self, before: dict[str, Any]) -> None:
        if not is_main():
            return
        write_json_atomic(self.eval_before_path, before)

    def read_eval_before(self) -> dict[str, Any] | None:
        data = _read_json(self.eval_before_path)
        return data if isinstance(data, dict) else None

    def write_eval_texts(self, texts: list[str]) -> None:
        """Keep up to :data:`EVAL_TEXTS_KEPT` held-out documents for the merge check and ``lora-dapt eval``."""
        if not is_main():
            return
        write_json_atomic(self.eval_texts_path, list(texts)[:EVAL_TEXTS_KEPT])

    def read_eval_texts(self) -> list[str] | None:
        """The held-out documents training kept; None when the run kept none."""
        texts = _read_json(self.eval_texts_path)
        if texts is None:
            return None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RunDirError(f"{self.eval_texts_path}: expected a JSON list of strings")
        return texts

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not is_main():
            return
        write_json_atomic(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any] | None:
        """``summary.json``; None when the run has not finished; RunDirError when it is unreadable."""
        data = _read_json(self.summary_path)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise RunDirError(f"{self.summary_path}: not a JSON object")
        return data

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step}"

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, newest first (complete or not)."""
        return checkpoint_dirs(self.path)

    def mark_complete(self, step: int, tokens: int) -> bool:
        """Write the completion marker into checkpoint ``step``, after all its files are saved: each file's
        size and sha256, every file fsynced first (:func:`~lora_dapt.checkpoints.write_marker`); False when
        that checkpoint does not exist (always False on ranks other than 0: rank 0 marks)."""
        if not is_main():
            return False
        ckpt = self.checkpoint_dir(step)
        if not ckpt.is_dir():
            return False
        write_marker(ckpt, step, tokens)
        return True

    def rotate_checkpoints(self, newest: int, keep: int) -> list[Path]:
        """Once checkpoint ``newest`` is marked: delete all but the ``keep`` newest complete checkpoints (and
        never the one this session resumed from); returns the deleted directories."""
        if not is_main():
            return []
        deleted = rotate_checkpoints(self.path, newest, keep, protect=self._resumed_from)
        for ckpt in deleted:
            log.debug("rotated out %s", ckpt)
        return deleted

    def find_resume_checkpoint(self, resume_from: str) -> Path | None:
        """Resolve ``resume_from`` ('latest' or a path); see :func:`~lora_dapt.checkpoints.find_resume_checkpoint`."""
        return find_resume_checkpoint(self.path, resume_from)

    def start(
        self,
        resume_from: str | None,
        *,
        overwrite: bool = False,
        before_resume: Callable[[Resume], None] | None = None,
    ) -> Resume | None:
        """Lock the directory and make it ready for training; the checkpoint to continue from, or None for a
        fresh start.

        * The lock: a second process gets a TrainingError naming the PID that holds the directory. It is
          held until :meth:`close`; released on any error raised here.
        * Resume (``resume_from`` 'latest' or a checkpoint path): the newest checkpoint that passes
          :func:`~lora_dapt.checkpoints.checkpoint_problem`; the metrics log is cut back to its step and
          the checkpoints saved after it are deleted, so no step appears twice. 'latest' in a directory
          that holds a run but no usable checkpoint is refused (naming what was found and why each
          checkpoint is unusable), and nothing is deleted; in a directory without a run it starts fresh.
        * Fresh start in a directory that holds a run (checkpoints, a metrics log, an adapter, a summary):
          refused unless ``overwrite``, which deletes that run's files (with a warning).

        ``before_resume(resume)`` is called once the checkpoint is chosen, under the lock and before anything
        is changed: it may refuse the resume by raising (a changed config, say).

        Under several processes all of this runs on rank 0 alone, which alone holds the lock; the other ranks
        wait, then get the same Resume (or raise the same error).
        """

        def start_here() -> Resume | None:
            self.create()
            if self._lock is None:
                self._lock = RunLock.acquire(self.path)
            try:
                return start_run(self, resume_from, overwrite=overwrite, before_resume=before_resume)
            except BaseException:
                self.close()
                raise

        resume = run_on_main(start_here)
        self._resumed_from = resume.checkpoint if resume else None
        return resume

    def previous_run(self) -> list[str]:
        """What an earlier run left here (checkpoints, the metrics log, the adapter, the summary), one short
        description each; [] when there is none."""
        found = []
        ckpts = self.checkpoints()
        if ckpts:
            names = ", ".join(p.name for p in ckpts[:3]) + (", ..." if len(ckpts) > 3 else "")
            found.append(f"{len(ckpts)} checkpoint(s): {names}")
        if self.metrics_path.exists():
            steps = [r.get("step") for r in self.read_metrics() if r.get("type") == "train"]
            last = max((s for s in steps if isinstance(s, int)), default=None)
            found.append(
                f"metrics.jsonl with {len(steps)} train row(s)" + (f" up to step {last}" if last else "")
            )
        if self.adapter_dir.exists():
            found.append("adapter/")
        if self.summary_path.exists():
            found.append("summary.json")
        return found

    def has_previous_run(self) -> bool:
        """True when checkpoints, a metrics log, an adapter or a summary of an earlier run are here."""
        return bool(self.previous_run())

    def clear_previous_run(self) -> int:
        """Delete an earlier run's checkpoints, metrics log, adapter, summary, evaluation before training and
        report (a fresh start with ``train.overwrite``); returns the checkpoints removed (0 on ranks other
        than 0, which delete nothing)."""
        if not is_main():
            return 0
        old = self.checkpoints()
        for path in [*old, self.adapter_dir, self.plots_dir, self.tensorboard_dir]:
            shutil.rmtree(path, ignore_errors=True)
        for path in (
            self.metrics_path,
            self.summary_path,
            self.eval_before_path,
            self.report_path,
            self.trackers_path,
        ):
            path.unlink(missing_ok=True)
        return len(old)

    def check_disk_space(self, needed_bytes: int, what: str) -> None:
        check_disk_space(self.path, needed_bytes, what)
