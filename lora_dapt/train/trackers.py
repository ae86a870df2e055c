"""Experiment trackers (``train.report_to``): the Trainer's rows and ours in the same tracker runs.

transformers' integrations (``report_to`` and ``run_name`` of TrainingArguments) log what the Trainer logs:
loss, learning rate, gradient norm, tokens and tokens/s, at the Trainer's global step, which is the
``step`` of the metrics log's train rows. Our own rows happen outside the Trainer's logging: the
evaluation before training (step 0, before the Trainer exists), every ``train.eval_every`` steps, after
training (when ``trainer.train()`` has returned and the Trainer's TensorBoard callback has closed its
writer), the forgetting figures, and whatever a later stage adds (:meth:`Trackers.log_scalars`).
:class:`Trackers` writes those through each tracker's own API into the same run, at the step of their
metrics-log row:

* TensorBoard: ``RUN_DIR/tensorboard``, where the Trainer's callback writes too (given its own writer
  there, instead of ``checkpoints/runs/DATE``): two event files, one run in TensorBoard;
* W&B: the run started here before the evaluation before training, which the Trainer's WandbCallback
  reuses (it starts one only when none is active); x axis ``train/global_step``, as the callback's;
* MLflow: the active run started here; MLflowCallback neither starts a second one nor ends ours.

Other integrations (trackio, comet_ml, clearml, ...) get the Trainer's rows only (a warning says so).
Tags: ``eval/{split}/{loss,ppl,bits_per_byte}`` and ``forgetting/{split}/{ppl_change,...}``.

A tracker whose package is missing is a :class:`~lora_dapt.errors.ConfigError` naming the pip install,
raised by :func:`check_trackers` before anything is trained.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..rundir import RunDir

log = logging.getLogger("lora_dapt")

TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "azure_ml": ("azureml.core", "azureml-core"),
    "neptune": ("neptune", "neptune"),
    "clearml": ("clearml", "clearml"),
    "codecarbon": ("codecarbon", "codecarbon"),
    "dagshub": ("dagshub", "dagshub"),
    "flyte": ("flytekit", "flytekit"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}
"""transformers' ``report_to`` names (its ``INTEGRATION_TO_CALLBACK``, less kubeflow, which it adds by
itself from an environment variable) -> (the module it needs, the pip package that provides it)."""

WRITTEN_HERE = ("tensorboard", "wandb", "mlflow")
"""Trackers our evaluation rows are written to (the others get the Trainer's rows only)."""

EVAL_METRICS = ("loss", "ppl", "bits_per_byte")
"""The figures of an evaluation row that go to the trackers, as ``eval/{split}/{name}``."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def tracker_names(report_to: str | list[str] | None) -> list[str]:
    """``train.report_to`` as a list of tracker names: 'none' (or None) -> [], 'all' -> every tracker whose
    package is installed, a name -> [name]; duplicates dropped, order kept."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names:
        names = [n for n, (module, _) in TRACKERS.items() if _installed(module)]
    return list(dict.fromkeys(n for n in names if n != "none"))


def tracker_problems(report_to: str | list[str] | None, key: str = "train.report_to") -> list[str]:
    """Problem lines for names that are no tracker (with the closest one); used by the config's checks."""
    known = [*TRACKERS, "none", "all"]
    out = []
    for name in [report_to] if isinstance(report_to, str) else list(report_to or []):
        if name not in known:
            guess = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else f"known: {', '.join(known)}"
            out.append(f"{key} = {name!r}: not a tracker; {hint}")
    return out


def check_trackers(report_to: str | list[str] | None) -> list[str]:
    """The tracker names of ``report_to``, checked: every package installed, else one ConfigError naming the
    pip install of each missing one. Call it before anything is trained."""
    problems = tracker_problems(report_to)
    if problems:
        raise ConfigError(problems)
    names = tracker_names(report_to)
    missing = [n for n in names if not _installed(TRACKERS[n][0])]
    if missing:
        raise ConfigError(
            [
                f"train.report_to names {n!r} but its package is not installed: pip install {TRACKERS[n][1]} "
                "(pip install 'lora_dapt[trackers]' installs tensorboard, wandb and mlflow), or remove it "
                "from train.report_to"
                for n in missing
            ]
        )
    return names


def scalars(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a (nested) dict as flat tags: ``scalars("f", {"domain": {"ppl": 3.0}})`` is
    ``{"f/domain/ppl": 3.0}``; booleans, strings, None and non-finite values are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(scalars(tag, value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)
    return out


def _written(names: list[str]) -> list[str]:
    """The names among ``names`` written here, in the order :meth:`Trackers.start` opens their writers."""
    return [n for n in WRITTEN_HERE if n in names]


class _TensorBoardWriter:
    """Our scalars into the run's TensorBoard directory (an event file beside the Trainer's)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def record(self) -> dict[str, Any]:
        return {}

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_texts(self, values: dict[str, str], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_text(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandbWriter:
    """The W&B run (started here unless one is active: then it is the caller's, and left open); ``resume``:
    the id of the run to continue (recorded by an earlier session of the same run directory)."""

    def __init__(self, run_name: str | None, resume: dict[str, Any] | None = None) -> None:
        import wandb

        self.wandb = wandb
        self.owned = wandb.run is None
        if self.owned:  # the same project the Trainer's WandbCallback would pick
            project = (resume or {}).get("project") or os.getenv("WANDB_PROJECT", "huggingface")
            run_id = (resume or {}).get("id")
            if run_id:
                wandb.init(project=project, name=run_name, id=run_id, resume="allow")
            else:
                wandb.init(project=project, name=run_name)
        wandb.define_metric("train/global_step")
        wandb.define_metric("*", step_metric="train/global_step", step_sync=True)

    def record(self) -> dict[str, Any]:
        run = self.wandb.run
        return {"id": run.id, "project": run.project} if run is not None else {}

    def log(self, values: dict[str, float], step: int) -> None:
        self.wandb.log({**values, "train/global_step": step})

    def log_texts(self, values: dict[str, str], step: int) -> None:
        if self.wandb.run is not None:
            self.wandb.run.summary.update(values)

    def close(self) -> None:
        if self.owned and self.wandb.run is not None:
            self.wandb.finish()


class _MlflowWriter:
    """The active MLflow run (started here unless one is active: then it is the caller's, and left open);
    ``resume``: the run to continue, when it is in the same tracking store."""

    def __init__(self, run_name: str | None, resume: dict[str, Any] | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        self.owned = mlflow.active_run() is None
        if self.owned:
            run_id = (resume or {}).get("run_id")
            uri = mlflow.get_tracking_uri()
            if run_id and resume.get("tracking_uri") not in (None, uri):
                log.warning(
                    "train.report_to: the run's MLflow run %s is in %s, but the tracking URI is now %s: a new "
                    "MLflow run is started (set MLFLOW_TRACKING_URI to continue the recorded one)",
                    run_id,
                    resume.get("tracking_uri"),
                    uri,
                )
                run_id = None
            if run_id:
                mlflow.start_run(run_id=run_id)
            else:
                experiment = os.getenv("MLFLOW_EXPERIMENT_NAME")  # as MLflowCallback reads it
                if experiment:
                    mlflow.set_experiment(experiment)
                mlflow.start_run(run_name=run_name)

    def record(self) -> dict[str, Any]:
        run = self.mlflow.active_run()
        if run is None:
            return {}
        return {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": self.mlflow.get_tracking_uri(),
        }

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def log_texts(self, values: dict[str, str], step: int) -> None:
        self.mlflow.set_tags(values)

    def close(self) -> None:
        if self.owned and self.mlflow.active_run() is not None:
            self.mlflow.end_run()


@dataclass
class Trackers:
    """The trackers of one training run; a no-op when ``names`` is empty or on a rank other than 0.

    Example::

        with Trackers(["tensorboard"], "demo", run.tensorboard_dir) as trackers:
            trackers.start()
            trackers.log_eval(0, {"domain": {"loss": 2.1, "ppl": 8.2}})
    """

    names: list[str]
    """Checked tracker names (:func:`check_trackers`)."""
    run_name: str | None = None
    """train.run_name: the run's name in W&B and MLflow."""
    log_dir: Path | None = None
    """The TensorBoard directory (``RunDir.tensorboard_dir``)."""
    main_process: bool = True
    """False on the other ranks of a distributed run: nothing is written there."""
    run: RunDir | None = None
    """The run directory: the W&B / MLflow run ids are recorded in its ``trackers.json``, and a later session
    of the same run (a resume, the merge after training) continues those runs instead of starting new ones."""
    _writers: list[Any] = field(default_factory=list, init=False, repr=False)
    _trainer_tb: Any = field(default=None, init=False, repr=False)
    _started: bool = field(default=False, init=False, repr=False)

    @property
    def active(self) -> bool:
        return bool(self.names) and self.main_process

    def start(self) -> None:
        """Open the writers (once). Call it after the run directory is set up and before the first row."""
        if self._started or not self.active:
            return
        self._started = True
        recorded = (self.run.read_trackers() if self.run is not None else None) or {}
        if "tensorboard" in self.names:
            if self.log_dir is None:
                raise ValueError("Trackers: report_to has tensorboard but no log_dir was given")
            self._writers.append(_TensorBoardWriter(self.log_dir))
        if "wandb" in self.names:
            self._writers.append(_WandbWriter(self.run_name, recorded.get("wandb")))
        if "mlflow" in self.names:
            self._writers.append(_MlflowWriter(self.run_name, recorded.get("mlflow")))
        if self.run is not None:
            ids = {name: w.record() for name, w in zip(_written(self.names), self._writers, strict=True)}
            self.run.write_trackers(
                {"report_to": self.names, "run_name": self.run_name, **{k: v for k, v in ids.items() if v}}
            )
        others = [n for n in self.names if n not in WRITTEN_HERE]
        if others:
            log.warning(
                "train.report_to: %s get the Trainer's rows (loss, learning rate, ...) but not lora_dapt's "
                "evaluation rows, which go to %s and metrics.jsonl",
                ", ".join(others),
                ", ".join(n for n in WRITTEN_HERE if n in self.names) or "metrics.jsonl only",
            )

    def trainer_callbacks(self) -> list[Any]:
        """Callbacks that replace the Trainer's own for the same tracker: a TensorBoardCallback whose writer
        writes into :attr:`log_dir` (the Trainer's default is ``output_dir/runs/DATE``)."""
        if not (self.active and "tensorboard" in self.names and self.log_dir is not None):
            return []
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # the callback closes it at the end of trainer.train(); close() closes it too when train() never ran
        self._trainer_tb = SummaryWriter(log_dir=str(self.log_dir))
        return [TensorBoardCallback(tb_writer=self._trainer_tb)]

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Write ``values`` (tag -> number) at ``step`` to every tracker written here."""
        if not values or not self.active:
            return
        self.start()
        for writer in self._writers:
            writer.log(values, step)

    def log_texts(self, values: dict[str, str], step: int) -> None:
        """Write text values (tag -> string) at ``step``: TensorBoard text, MLflow tags, the W&B summary."""
        if not values or not self.active:
            return
        self.start()
        for writer in self._writers:
            writer.log_texts(values, step)

    def log_eval(self, step: int, results: dict[str, Any]) -> None:
        """One evaluation (split -> an EvalResult dict, as its metrics-log rows) as ``eval/{split}/...``."""
        values = {
            f"eval/{split}/{name}": float(res[name])
            for split, res in results.items()
            if isinstance(res, dict) and isinstance(res.get("ppl"), (int, float))
            for name in EVAL_METRICS
            if isinstance(res.get(name), (int, float)) and math.isfinite(res[name])
        }
        self.log_scalars(values, step)

    def log_forgetting(self, report: dict[str, Any], step: int) -> None:
        """The before -> after comparison (the summary's ``forgetting``) as ``forgetting/...`` at ``step``."""
        self.log_scalars(scalars("forgetting", report or {}), step)

    def close(self) -> None:
        """Close what was opened here (runs started by the caller stay open)."""
        if self._trainer_tb is not None:
            self._trainer_tb.close()
            self._trainer_tb = None
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


MERGE_FIGURES = (
    "perplexity_adapter",
    "perplexity_merged",
    "ppl_rel_diff",
    "max_abs_logit_diff",
    "adapter_effect",
)
"""The numbers of ``merge_report.json`` logged as ``merge/{name}`` (with ``merge/passed`` 1 or 0, the held-out
loss and perplexity of every base under ``merge/losses/...``, and the chosen dtype as the text ``merge/dtype``)."""


def merge_figures(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(scalars, texts) of a merge report (:class:`~lora_dapt.export.report.MergeReport` as a dict)."""
    values: dict[str, Any] = {k: report[k] for k in MERGE_FIGURES if k in report}
    values["passed"] = 1.0 if report.get("passed") is True else 0.0
    values["losses"] = report.get("losses") or {}
    return scalars("merge", values), {"merge/dtype": str(report["dtype"])}


def log_merge(run: RunDir, report: dict[str, Any]) -> bool:
    """Log a merge's figures (:func:`merge_figures`) to the trackers the run recorded (``trackers.json``),
    continuing the same runs, at the run's last step (``summary.json`` steps). False (nothing logged) when
    the run used no tracker that is written here."""
    recorded = run.read_trackers() or {}
    names = _written(list(recorded.get("report_to") or []))
    if not names:
        return False
    step = int((run.read_summary() or {}).get("steps") or 0)
    values, texts = merge_figures(report)
    with Trackers(names, recorded.get("run_name"), run.tensorboard_dir, run=run) as trackers:
        trackers.log_scalars(values, step)
        trackers.log_texts(texts, step)
    log.info("merge figures logged to %s at step %d", ", ".join(names), step)
    return True
