"""A run's report (Markdown) and PNG plots, built from what the run directory holds, read through RunDir.

Inputs (each optional; whatever is missing or unreadable is named in the report instead of stopping it,
because a report is most needed for a run that crashed or was stopped):

* the metrics log (:meth:`RunDir.read_metrics`): appended while training, so its last line can be cut short
  by a crash (it is skipped with a warning). Rows (:class:`~lora_dapt.rundir.TrainRow`, ``EvalRow``)::

      {"type": "train", "step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", ...}
      {"type": "eval", "step", "tokens", "eval_tokens", "phase": "before"|"during"|"after",
       "split": "domain"|"general", "loss", "ppl", "bits_per_byte", ...}

* the summary (:meth:`RunDir.read_summary`), written at the end of a run
  (:class:`lora_dapt.train.TrainResult` plus ``data_stats``): ``before`` / ``after`` (split ->
  :meth:`EvalResult.to_dict`, and ``samples``: a list of ``{"prompt", "completion"}``), ``forgetting``,
  ``steps``, ``tokens_trained``, ``final_loss``, ``tokens_per_s``, ``wall_time_s``, ``peak_memory_bytes``,
  ``stopped``, ``data_stats``.
* the resolved run configuration (:meth:`RunDir.read_config`).

Outputs: the report at :attr:`RunDir.report_path`, and in :attr:`RunDir.plots_dir` the plots of
:mod:`lora_dapt.evaluate.plots` (train and eval loss vs tokens trained; the learning rate).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import RunDirError
from ..rundir import RunDir
from .forgetting import forgetting_report
from .plots import LOSS_PLOT, LR_PLOT, plot_loss, plot_lr

__all__ = ["RunDirError", "load_metrics", "plot_loss", "plot_lr", "write_report"]

T = TypeVar("T")

log = logging.getLogger("lora_dapt")


# What the configuration table of the report shows, in order: (section, key, label).
_CONFIG_ROWS = (
    ("model", "name_or_path", "base model"),
    ("model", "quantization", "quantization"),
    ("model", "compute_dtype", "compute dtype"),
    ("adapter", "r", "LoRA rank"),
    ("adapter", "alpha", "LoRA alpha"),
    ("adapter", "target_modules", "target modules"),
    ("adapter", "use_rslora", "rsLoRA"),
    ("adapter", "use_dora", "DoRA"),
    ("adapter", "train_embeddings", "train embeddings"),
    ("data", "sources", "domain sources"),
    ("data", "seq_len", "sequence length"),
    ("data", "eval_fraction", "eval fraction"),
    ("train", "learning_rate", "learning rate"),
    ("train", "scheduler", "scheduler"),
    ("train", "batch_size", "batch size"),
    ("train", "gradient_accumulation_steps", "gradient accumulation"),
    ("train", "max_steps", "max steps"),
    ("train", "epochs", "epochs"),
    ("train", "max_tokens", "max tokens"),
    ("train", "optimizer", "optimizer"),
    ("eval", "general_sources", "general-text sources"),
)


_NO_SUMMARY = "not found (the run did not finish, or is still running)"


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics log in order; [] when there is none (:meth:`RunDir.read_metrics`).

    A last line that is not valid JSON (a crash in the middle of a write) is skipped with a warning; so is
    any other malformed line, naming its number. Raises :class:`RunDirError` when ``run_dir`` is not a
    directory.

    Example::

        rows = load_metrics("runs/demo")
        losses = [r["loss"] for r in rows if r.get("type") == "train"]
    """
    return RunDir.open(run_dir).read_metrics()


def _read(path: Path, read: Callable[[], T], absent: str, missing: list[str]) -> T | None:
    """``read()``, or None with a line in ``missing`` when the file at ``path`` is absent or unreadable."""
    if not path.is_file():
        missing.append(f"`{path.name}`: {absent}")
        return None
    try:
        return read()
    except RunDirError as e:
        missing.append(f"`{path.name}`: unreadable ({e})")
        return None


def _num(value: Any, spec: str = ".4g") -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return "-"  # unreachable


def _human_time(s: Any) -> str:
    if not isinstance(s, (int, float)) or s < 0:
        return "-"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _cell(value: Any) -> str:
    """A value as a Markdown table cell: lists joined, long text shortened, pipes escaped."""
    if isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value[:5]) + (
            f", ... ({len(value)} in all)" if len(value) > 5 else ""
        )
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={_num(v)}" for k, v in value.items())
    else:
        text = _num(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _pct(change: Any) -> str:
    return "-" if not isinstance(change, (int, float)) else f"{100 * change:+.1f}%"


def _evals_by_phase(summary: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"before": {split: result dict}, "after": {...}}; the summary wins, else the last eval row per split."""
    out: dict[str, dict[str, Any]] = {"before": {}, "after": {}}
    for row in rows:
        if row.get("type") == "eval" and row.get("phase") in out and isinstance(row.get("split"), str):
            # A row's "tokens" may be tokens trained or tokens scored (see plots.eval_x): shown as neither.
            out[row["phase"]][row["split"]] = {**row, "tokens": row.get("eval_tokens")}
    for phase in out:
        from_summary = summary.get(phase)
        if isinstance(from_summary, dict):
            evals = {k: v for k, v in from_summary.items() if isinstance(v, dict) and "ppl" in v}
            out[phase].update(evals)
    return out


def _config_section(config: dict[str, Any], name: str) -> list[str]:
    rows = []
    for section, key, label in _CONFIG_ROWS:
        part = config.get(section)
        if isinstance(part, dict) and key in part and part[key] not in (None, [], ""):
            rows.append((label, _cell(part[key])))
    lines = ["## Configuration", ""]
    if not config:
        return lines + ["_No configuration found._", ""]
    lines += _table(("setting", "value"), rows)
    full = yaml.safe_dump(config, sort_keys=False).rstrip()
    return lines + [
        "",
        f"<details><summary>full {name}</summary>",
        "",
        "```yaml",
        full,
        "```",
        "",
        "</details>",
        "",
    ]


def _data_section(stats: Any, name: str) -> list[str]:
    lines = ["## Data", ""]
    if not isinstance(stats, dict) or not stats:
        return lines + [f"_No data statistics in {name}._", ""]
    rows = []
    for key, value in stats.items():
        if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
            rows += [(f"{key}.{k}", _cell(v)) for k, v in value.items()]
        else:
            rows.append((str(key), _cell(value)))
    return lines + _table(("statistic", "value"), rows) + [""]


_EVAL_HEADER = (
    "split",
    "ppl before",
    "ppl after",
    "change",
    "bits/byte before",
    "bits/byte after",
    "tokens scored",
)


def _original_lines(summary: dict[str, Any]) -> list[str]:
    """The table against the ORIGINAL 16-bit model (first: what a user gains and gives up), or why the run
    has none."""
    plan = summary.get("original_base") or {}
    headline = summary.get("forgetting") or {}
    if not summary.get("forgetting_as_trained"):
        if plan and not plan.get("scored") and plan.get("reason"):
            return [f"The original 16-bit model was not scored: {plan['reason']}.", ""]
        return []
    after = (summary.get("after") or {}).get("original_16bit") or {}
    rows = [
        (
            split,
            _num(r.get("ppl_before"), ".3f"),
            _num(r.get("ppl_after"), ".3f"),
            _pct(r.get("ppl_change")),
            _num(r.get("bpb_before"), ".4f"),
            _num(r.get("bpb_after"), ".4f"),
            _num((after.get(split) or {}).get("tokens")),
        )
        for split, r in headline.items()
    ]
    lines = [f"### Against {summary.get('forgetting_reference') or 'the original 16-bit model'}", ""]
    lines += _table(_EVAL_HEADER, rows) + [""]
    for split, word in (("domain", "gain"), ("general", "forgetting")):
        change = (headline.get(split) or {}).get("ppl_change")
        if isinstance(change, float):
            lines.append(
                f"{split.capitalize()} perplexity against the original: {_pct(change)} ({word} as shipped)."
            )
    return lines + ["", "### On the 4-bit base as trained", ""]


def _eval_section(
    evals: dict[str, dict[str, Any]], missing: list[str], summary: dict[str, Any] | None = None
) -> list[str]:
    lines = ["## Before / after training", ""]
    before, after = evals["before"], evals["after"]
    if not before and not after:
        missing.append("evaluations: none found (eval disabled, or the run stopped before the first one)")
        return lines + ["_No evaluation was recorded._", ""]
    if not after:
        missing.append("after-training evaluation: none (the run stopped early or was interrupted)")
    if not before:
        missing.append("before-training evaluation: none")
    lines += _original_lines(summary or {})
    report = forgetting_report(before, after)
    rows = []
    for split, r in report.items():
        tokens = (after.get(split) or before.get(split) or {}).get("tokens")
        rows.append(
            (
                split,
                _num(r["ppl_before"], ".3f"),
                _num(r["ppl_after"], ".3f"),
                _pct(r["ppl_change"]),
                _num(r["bpb_before"], ".4f"),
                _num(r["bpb_after"], ".4f"),
                _num(tokens),
            )
        )
    lines += _table(_EVAL_HEADER, rows)
    notes = [""]
    if "domain" in report and isinstance(report["domain"]["ppl_change"], float):
        notes.append(
            f"Domain perplexity changed by {_pct(report['domain']['ppl_change'])} (lower is better)."
        )
    if "general" in report and isinstance(report["general"]["ppl_change"], float):
        change = report["general"]["ppl_change"]
        verdict = "forgetting" if change > 0 else "no forgetting measured"
        notes.append(f"General-text perplexity changed by {_pct(change)}: {verdict}.")
    return lines + notes + [""]


def _budget_section(budget: Any) -> list[str]:
    """The forgetting budget: every check during training, the step where it was crossed marked, the best
    step inside it (restored or not), and the verdict on the 16-bit figures."""
    if not isinstance(budget, dict) or not budget:
        return []
    lines = ["## Forgetting budget", ""]
    lines.append(
        f"General perplexity may rise {_pct(budget.get('limit'))} above {budget.get('reference')}: "
        f"{_num(budget.get('reference_ppl'), '.3f')}."
    )
    rows = []
    for c in budget.get("checks") or []:
        step = c.get("step")
        mark = "**budget crossed: run stopped**" if step == budget.get("crossed_at") else "within"
        if step == budget.get("best_step"):
            mark = "best inside the budget" + (" (restored)" if budget.get("restored") else "")
        rows.append((_num(step), _num(c.get("domain_loss"), ".4f"), _num(c.get("general_ppl"), ".3f"), mark))
    if rows:
        lines += [""] + _table(("step", "domain loss", "general ppl", "budget"), rows)
    if budget.get("message"):
        lines += ["", f"{budget['message']}."]
    final = budget.get("original_16bit")
    if isinstance(final, dict):
        verdict = "within the budget" if final.get("within") else "**over the budget**"
        lines += [
            "",
            f"Against the original 16-bit model: general ppl {_num(final.get('ppl_before'), '.3f')} -> "
            f"{_num(final.get('ppl_after'), '.3f')} ({_pct(final.get('change'))}): {verdict}.",
        ]
    return lines + [""]


_BASES = {"original_16bit": "original 16-bit model", "as_trained": "4-bit base as trained"}


def _probes_section(probes: Any, lm_eval: Any) -> list[str]:
    """Probe accuracy and lm-evaluation-harness metrics before -> after, the original 16-bit model first."""
    lines: list[str] = []
    if isinstance(probes, dict) and probes:
        rows = []
        for base, report in probes.items():
            for split, r in report.items():
                if isinstance(r, dict):
                    acc = f"{_num(r.get('correct_before'))} -> {_num(r.get('correct_after'))} of {_num(r.get('total'))}"
                    rows.append(
                        (
                            _BASES.get(base, base),
                            split,
                            _pct(r.get("accuracy_before"))[1:],
                            _pct(r.get("accuracy_after"))[1:],
                            acc,
                        )
                    )
        notes = [f"Note: {r['note']}." for r in probes.values() if r.get("note")]
        lines += [
            "## Knowledge probes",
            "",
            "Right when the answer has the highest total log-probability.",
            "",
        ]
        lines += _table(("model", "split", "accuracy before", "accuracy after", "right"), rows) + ["", *notes]
    if isinstance(lm_eval, dict) and lm_eval:
        rows = []
        for base, sides in lm_eval.items():
            b, a = (sides.get("before") or {}).get("tasks", {}), (sides.get("after") or {}).get("tasks", {})
            for task in sorted(set(b) | set(a)):
                for metric in sorted(set(b.get(task, {})) | set(a.get(task, {}))):
                    if "stderr" not in metric:
                        rows.append(
                            (
                                _BASES.get(base, base),
                                task,
                                metric,
                                _num(b.get(task, {}).get(metric), ".4f"),
                                _num(a.get(task, {}).get(metric), ".4f"),
                            )
                        )
        lines += ["## lm-evaluation-harness", ""] + _table(
            ("model", "task", "metric", "before", "after"), rows
        )
        lines.append("")
    return lines


def _training_section(summary: dict[str, Any], train_rows: list[dict[str, Any]]) -> list[str]:
    last = train_rows[-1] if train_rows else {}
    steps = summary.get("steps", last.get("step"))
    tokens = summary.get("tokens_trained", last.get("tokens"))
    final_loss = summary.get("final_loss", last.get("loss"))
    tps = summary.get("tokens_per_s", last.get("tokens_per_s"))
    wall = summary.get("wall_time_s", last.get("elapsed_s"))
    rows = [
        ("optimizer steps", _num(steps)),
        ("tokens trained", _num(tokens)),
        ("final train loss", _num(final_loss, ".4f")),
        ("throughput", f"{_num(tps, ',.1f')} tokens/s" if isinstance(tps, (int, float)) else "-"),
        ("wall time", _human_time(wall)),
        ("peak memory", _human_bytes(summary.get("peak_memory_bytes"))),
    ]
    lines = ["## Training", ""] + _table(("", ""), rows)
    if summary.get("stopped"):
        lines += ["", f"Stopped early: {summary['stopped']}."]
    return lines + [""]


def _samples(summary: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(prompt, before, after) from summary['before'/'after']['samples'] or summary['samples']."""
    by_prompt: dict[str, dict[str, str]] = {}
    sources = {phase: (summary.get(phase) or {}).get("samples") for phase in ("before", "after")}
    top = summary.get("samples")
    if isinstance(top, dict):
        sources = {phase: sources[phase] or top.get(phase) for phase in sources}
    elif isinstance(top, list):  # [{"prompt", "before", "after"}]
        for s in top:
            if isinstance(s, dict) and "prompt" in s:
                by_prompt[str(s["prompt"])] = {
                    k: str(s[k]) for k in ("before", "after") if s.get(k) is not None
                }
    for phase, samples in sources.items():
        for s in samples if isinstance(samples, list) else []:
            if isinstance(s, dict) and "prompt" in s:
                by_prompt.setdefault(str(s["prompt"]), {})[phase] = str(s.get("completion", ""))
    return [(p, d.get("before"), d.get("after")) for p, d in by_prompt.items()]


def _samples_section(samples: list[tuple[str, str | None, str | None]]) -> list[str]:
    if not samples:
        return []
    lines = ["## Generation samples (greedy)", ""]
    for prompt, before, after in samples:
        shown = prompt.replace("`", "'")  # keep the inline code span closed
        lines += [f"**Prompt:** `{shown}`", ""]
        for label, text in (("before", before), ("after", after)):
            # A four-backtick fence: model output cannot close it by writing ``` itself.
            body = "(none)" if text is None else text
            lines += [f"{label}:", "", "````text", prompt + body, "````", ""]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write the run's report (:attr:`RunDir.report_path`) and its plots (in :attr:`RunDir.plots_dir`);
    return the report's path.

    Works on whatever the run left behind: missing or partial pieces (no summary after a crash, no
    after-training evaluation after an early stop, a cut-short last metrics line, an unreadable file) are
    listed under "Missing" in the report. Raises :class:`RunDirError` when ``run_dir`` is not a directory.

    Example::

        path = write_report("runs/demo")      # also: lora-dapt report runs/demo
        print(path.read_text())
    """
    run = RunDir.open(run_dir)
    missing: list[str] = []
    rows = _read(run.metrics_path, run.read_metrics, "not found, so there are no curves", missing) or []
    summary = _read(run.summary_path, run.read_summary, _NO_SUMMARY, missing) or {}
    config = _read(run.config_path, run.read_config, "not found, so the configuration is not shown", missing)
    train_rows = sorted(
        (r for r in rows if r.get("type") == "train"),
        key=lambda r: (r.get("step") or 0, r.get("tokens") or 0),
    )
    eval_rows = [r for r in rows if r.get("type") == "eval"]
    if rows and not train_rows:
        missing.append(
            f"training rows in {run.metrics_path.name}: none (the run stopped before the first logged step)"
        )

    loss_png = plot_loss(train_rows, eval_rows, run.plots_dir / LOSS_PLOT, summary.get("tokens_trained"))
    lr_png = plot_lr(train_rows, run.plots_dir / LR_PLOT)
    if loss_png is None:
        missing.append("loss plot: no train or eval losses to draw")
    if lr_png is None:
        missing.append("learning-rate plot: no learning rates logged")

    if summary.get("stopped"):
        status = f"stopped early: {summary['stopped']}"
    elif summary:
        status = "finished"
    else:
        status = f"incomplete (no {run.summary_path.name}: still running, crashed or interrupted)"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    header = [f"# Run report: {run.path.name}", "", f"- run directory: `{run.path}`", f"- status: {status}"]
    header += [f"- generated: {generated} by `lora-dapt report`", ""]
    lines = _eval_section(_evals_by_phase(summary, rows), missing, summary)
    lines += _budget_section(summary.get("budget"))
    lines += _probes_section(summary.get("probes"), summary.get("lm_eval"))
    lines += _training_section(summary, train_rows)
    lines += ["## Plots", ""]
    for png, title in ((loss_png, "loss"), (lr_png, "learning rate")):
        if png is not None:
            lines += [f"![{title}]({png.relative_to(run.path).as_posix()})", ""]
    lines += _samples_section(_samples(summary))
    lines += _data_section(summary.get("data_stats"), run.summary_path.name)
    lines += _config_section(config or {}, run.config_path.name)
    if missing:  # near the top: what the reader must know before trusting the numbers below
        header += ["## Missing", "", *(f"- {m}" for m in missing), ""]

    out = run.report_path
    out.write_text("\n".join(header + lines), encoding="utf-8")
    log.info("report written: %s%s", out, f" ({len(missing)} pieces missing)" if missing else "")
    return out
