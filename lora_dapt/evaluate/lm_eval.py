"""Optional lm-evaluation-harness tasks before and after training (``eval.lm_eval_tasks``).

For users who have task data on the machine: tasks the harness ships whose datasets are in the local
Hugging Face cache, or their own task YAML files in ``eval.lm_eval_include_path``. The model in memory (4-bit
base, or the adapter on it) is handed to the harness's ``HFLM`` wrapper and run through its Python API
(``lm_eval.simple_evaluate``), so nothing is reloaded. The package is an extra: ``pip install
'lora-dapt[lm-eval]'`` (or ``pip install lm-eval``); without it, a run that asks for tasks fails before
training with a :class:`~lora_dapt.errors.ConfigError` saying so.

What comes back is, per task, the harness's numeric metrics (``acc``, ``acc_norm``, ... and their stderr),
under ``"tasks"``; before/after are compared in the report.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

log = logging.getLogger("lora_dapt")

INSTALL = "pip install 'lora-dapt[lm-eval]'  (or: pip install lm-eval)"


def check_lm_eval(tasks: list[str], include_path: str | None) -> None:
    """Refuse, before training, tasks that cannot run: the package missing, or an include path that is not a
    directory. (Unknown task names are the harness's to report; they surface at the first evaluation.)"""
    if not tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"eval.lm_eval_tasks = {tasks!r} needs the lm-evaluation-harness package, which is not installed: "
            f"{INSTALL}; or set eval.lm_eval_tasks: []"
        )
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(
            f"eval.lm_eval_include_path = {include_path!r}: not a directory; give the directory of your task "
            "YAML files, or null"
        )


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """A task's numeric metrics ('acc,none' -> 'acc'), NaN and non-numbers left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key.split(",", 1)[0]] = float(value)
    return out


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: str | None = None,
    batch_size: int = 4,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run the harness ``tasks`` on ``model`` in memory; returns ``{"tasks": {task: {metric: value}}}``.

    Example::

        run_lm_eval(model, tok, ["my_local_task"], include_path="tasks/")["tasks"]["my_local_task"]["acc"]
    """
    check_lm_eval(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    was_training = model.training
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False
        )
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise DataError(
            f"lm-evaluation-harness could not run {tasks!r}: {e}. Check the task names (lm-eval --tasks list) "
            "and that their data is on this machine (eval.lm_eval_include_path for your own tasks)"
        ) from None
    finally:
        model.train(was_training)
    scores = {task: _numbers(m) for task, m in (results or {}).get("results", {}).items()}
    for task, m in scores.items():
        log.info("lm-eval %s: %s", task, ", ".join(f"{k} {v:.4f}" for k, v in m.items() if "stderr" not in k))
    return {"tasks": scores}
