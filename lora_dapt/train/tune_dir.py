"""The tune directory, and its one owner: :class:`TuneDir`.

``lora-dapt tune`` writes beside the run it tunes, in ``TRAIN_OUTPUT_DIR/tune`` (:attr:`RunDir.tune_dir
<lora_dapt.rundir.RunDir.tune_dir>`) unless told another directory. A run started later in the same
``train.output_dir`` leaves it alone (it is not part of a run: ``train.overwrite`` does not delete it), so a
run directory ends up holding the search that chose its settings::

    TUNE_DIR/
      lora_dapt.lock        flock'ed by the tune running here (one at a time)
      tune.json             the plan every trial shares (budget, data and eval fingerprints, schedule) and
                            the base model's scores; a rerun with another plan is refused
      trials.jsonl          one row per finished trial (a TrialResult): a rerun skips these trials
      results.md            the table of every trial, the choice and its reason
      tune.png              domain gain against forgetting, one point per trial
      chosen.yaml           the input config with the chosen values (lora-dapt train chosen.yaml)
      base/                 a RunDir: the metrics rows of the base model's evaluation
      trials/lr<LR>-r<R>-t<TOKENS_PER_STEP>/   a RunDir per trial: config, metrics log, adapter, summary

JSON files are written through a temporary file and a rename (:func:`~lora_dapt.rundir.write_json_atomic`);
``trials.jsonl`` is appended line by line, and a line cut short by a crash is skipped when read back (that
trial simply runs again).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoints import RunLock
from ..errors import RunDirError
from ..rundir import RunDir, write_json_atomic

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger("lora_dapt")


@dataclass
class TuneDir:
    """A tune directory: its layout, its lock, and every read and write of its files.

    Use it as a context manager after :meth:`lock`, so the lock goes with the tune whatever way it ends.
    """

    path: Path
    _lock: RunLock | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()

    def __enter__(self) -> TuneDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def lock(self) -> TuneDir:
        """Create the directory and take its lock (a TrainingError names the PID of another tune holding it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = RunLock.acquire(self.path)
        return self

    # -- layout --------------------------------------------------------------------------------------------
    @property
    def plan_path(self) -> Path:
        return self.path / "tune.json"

    @property
    def trials_path(self) -> Path:
        return self.path / "trials.jsonl"

    @property
    def results_path(self) -> Path:
        return self.path / "results.md"

    @property
    def plot_path(self) -> Path:
        return self.path / "tune.png"

    @property
    def chosen_path(self) -> Path:
        return self.path / "chosen.yaml"

    @property
    def base_run(self) -> RunDir:
        """Where the base model's evaluation rows are logged."""
        return RunDir(self.path / "base").create()

    def trial_run(self, name: str) -> RunDir:
        """The run directory of one trial (``continued_pretrain`` writes it)."""
        return RunDir(self.path / "trials" / name)

    # -- plan, trials ------------------------------------------------------------------------------------
    def read_plan(self) -> dict[str, Any] | None:
        """``tune.json``; None when this directory has none; RunDirError when it is unreadable."""
        if not self.plan_path.is_file():
            return None
        try:
            data = json.loads(self.plan_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunDirError(
                f"{self.plan_path} is unreadable ({type(e).__name__}: {e}); rerun with --overwrite"
            ) from None
        if not isinstance(data, dict):
            raise RunDirError(f"{self.plan_path}: expected a JSON object; rerun with --overwrite")
        return data

    def write_plan(self, plan: dict[str, Any]) -> None:
        write_json_atomic(self.plan_path, plan)

    def read_trials(self) -> list[dict[str, Any]]:
        """The rows of ``trials.jsonl`` in order ([] when none); a malformed line is skipped with a warning
        naming it (its trial runs again)."""
        if not self.trials_path.is_file():
            return []
        rows = []
        for i, line in enumerate(self.trials_path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning(
                    "%s: line %d is not valid JSON (cut short?); its trial runs again",
                    self.trials_path,
                    i + 1,
                )
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def append_trial(self, row: dict[str, Any]) -> None:
        """Append one finished trial (flushed: a crash loses at most the row being written)."""
        with self.trials_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    # -- results ---------------------------------------------------------------------------------------
    def write_results(self, text: str) -> Path:
        tmp = self.results_path.with_suffix(".md.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.results_path)
        return self.results_path

    def write_chosen(self, config: RunConfig) -> Path:
        """The chosen config as YAML (every key resolved, so ``RunConfig.from_yaml`` reads it back)."""
        config.to_yaml(self.chosen_path)
        return self.chosen_path

    def remove_chosen(self) -> None:
        """No trial was chosen this time: a chosen.yaml from an earlier choice must not look current."""
        self.chosen_path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete an earlier tune's files (``overwrite``); the lock file stays."""
        for path in (self.path / "trials", self.path / "base"):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.plan_path, self.trials_path, self.results_path, self.plot_path, self.chosen_path):
            path.unlink(missing_ok=True)
