"""A run's report: ``report.md`` and PNG plots, built from what the run directory holds.

Inputs (each optional; whatever is missing is named in the report instead of stopping it, because a report
is most needed for a run that crashed or was stopped):

* ``metrics.jsonl``: one JSON object per line, appended while training, so the last line can be cut short
  by a crash (:func:`load_metrics` skips it with a warning). Rows::

      {"type": "train", "step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", ...}
      {"type": "eval", "step", "tokens", "phase": "before"|"during"|"after", "split": "domain"|"general",
       "loss", "ppl", "bits_per_byte", ...}

* ``summary.json``: written at the end of a run (:class:`lora_dapt.train.TrainResult` plus ``data_stats``):
  ``before`` / ``after`` (split -> :meth:`EvalResult.to_dict`, and ``samples``: a list of
  ``{"prompt", "completion"}``), ``forgetting``, ``steps``, ``tokens_trained``, ``final_loss``,
  ``tokens_per_s``, ``wall_time_s``, ``peak_memory_bytes``, ``stopped``, ``data_stats``.
* ``config.yaml``: the resolved run configuration.

Outputs: ``report.md``, ``plots/loss.png`` (train loss and eval loss vs tokens trained) and ``plots/lr.png``.
Plots are drawn on matplotlib ``Figure`` objects with the Agg canvas, never through pyplot, so no display
is needed and the caller's matplotlib backend is left alone.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ..errors import RunDirError
from .forgetting import forgetting_report

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


def _run_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunDirError(
            f"run directory not found: {path} (give the train.output_dir of a run, the folder holding "
            "metrics.jsonl and config.yaml)"
        )
    return path


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` in order; [] when the file does not exist.

    A last line that is not valid JSON (a crash in the middle of a write) is skipped with a warning; so is
    any other malformed line, naming its number.

    Example::

        rows = load_metrics("runs/demo")
        losses = [r["loss"] for r in rows if r.get("type") == "train"]
    """
    path = _run_dir(run_dir) / "metrics.jsonl"
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


def _read_json(path: Path, missing: list[str]) -> dict[str, Any]:
    if not path.is_file():
        missing.append(f"`{path.name}`: not found (the run did not finish, or is still running)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        missing.append(f"`{path.name}`: unreadable ({e})")
        return {}
    if not isinstance(data, dict):
        missing.append(f"`{path.name}`: not a JSON object")
        return {}
    return data


def _read_config(path: Path, missing: list[str]) -> dict[str, Any]:
    if not path.is_file():
        missing.append("`config.yaml`: not found, so the configuration is not shown")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        missing.append(f"`config.yaml`: not valid YAML ({e})")
        return {}
    return data if isinstance(data, dict) else {}


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
            # A row's "tokens" may be tokens trained or tokens scored (see _eval_x): not shown as either.
            out[row["phase"]][row["split"]] = {**row, "tokens": row.get("eval_tokens")}
    for phase in out:
        from_summary = summary.get(phase)
        if isinstance(from_summary, dict):
            evals = {k: v for k, v in from_summary.items() if isinstance(v, dict) and "ppl" in v}
            out[phase].update(evals)
    return out


def _eval_x(row: dict[str, Any], train_rows: list[dict[str, Any]], tokens_trained: Any) -> float:
    """Tokens trained when an eval row was written, found from its step and the train rows.

    The eval row's own ``tokens`` is not trusted: rows are built as ``{..., "tokens": trained, **result}``
    and :meth:`EvalResult.to_dict` has a ``tokens`` key too (tokens scored), which then wins. Tokens per
    step are constant with packed blocks, so interpolating between logged train rows is exact up to rounding.
    """
    step = row.get("step") if isinstance(row.get("step"), (int, float)) else 0
    if row.get("phase") == "before" or step <= 0:
        return 0.0
    if row.get("phase") == "after" and isinstance(tokens_trained, (int, float)):
        return float(tokens_trained)
    pts = sorted(
        (float(r["step"]), float(r["tokens"]))
        for r in train_rows
        if isinstance(r.get("step"), (int, float))
        and isinstance(r.get("tokens"), (int, float))
        and r["step"] > 0
    )
    if not pts:
        return float(row["tokens"]) if isinstance(row.get("tokens"), (int, float)) else float(step)
    prev = (0.0, 0.0)
    for s, t in pts:
        if step <= s:
            return prev[1] + (t - prev[1]) * (step - prev[0]) / (s - prev[0])
        prev = (s, t)
    return prev[1] + (step - prev[0]) * prev[1] / prev[0]  # past the last logged step: same tokens per step


def _new_figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _x_of(rows: list[dict[str, Any]]) -> tuple[list[float], str]:
    """Tokens trained when the rows have them, else optimizer steps (older or partial logs)."""
    if (
        rows
        and all(isinstance(r.get("tokens"), (int, float)) for r in rows)
        and any(r["tokens"] for r in rows)
    ):
        return [float(r["tokens"]) for r in rows], "tokens trained"
    return [float(r.get("step") or 0) for r in rows], "optimizer step"


def plot_loss(
    train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]], path: Path, tokens_trained: Any = None
) -> Path | None:
    """Train loss and eval loss (per split, markers by phase) against tokens trained; None if nothing to draw."""
    train = [r for r in train_rows if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in eval_rows if isinstance(r.get("loss"), (int, float))]
    if not train and not evals:
        return None
    fig, ax = _new_figure()
    x, xlabel = _x_of(train)
    if train:
        ax.plot(x, [r["loss"] for r in train], color="tab:blue", linewidth=1.2, label="train loss")
    markers = {"before": "o", "during": ".", "after": "s"}
    colors = {"domain": "tab:orange", "general": "tab:green"}
    by_x = xlabel == "tokens trained" or not train
    for split in sorted({str(r.get("split")) for r in evals}):
        points = sorted(
            (
                (_eval_x(r, train, tokens_trained) if by_x else float(r.get("step") or 0)),
                r["loss"],
                str(r.get("phase")),
            )
            for r in evals
            if str(r.get("split")) == split
        )
        color = colors.get(split, "tab:gray")
        ax.plot([p[0] for p in points], [p[1] for p in points], color=color, linewidth=0.8, linestyle="--")
        for phase, marker in markers.items():
            sel = [p for p in points if p[2] == phase]
            if sel:
                ax.scatter(
                    [p[0] for p in sel],
                    [p[1] for p in sel],
                    color=color,
                    marker=marker,
                    s=36,
                    zorder=3,
                    label=f"eval {split} ({phase})",
                )
    ax.set_xlabel(xlabel if train else "tokens trained")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_lr(train_rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Learning rate against tokens trained; None when no row has a learning rate."""
    rows = [r for r in train_rows if isinstance(r.get("lr"), (int, float))]
    if not rows:
        return None
    fig, ax = _new_figure()
    x, xlabel = _x_of(rows)
    ax.plot(x, [r["lr"] for r in rows], color="tab:purple", linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _config_section(config: dict[str, Any]) -> list[str]:
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
        "<details><summary>full config.yaml</summary>",
        "",
        "```yaml",
        full,
        "```",
        "",
        "</details>",
        "",
    ]


def _data_section(stats: Any) -> list[str]:
    lines = ["## Data", ""]
    if not isinstance(stats, dict) or not stats:
        return lines + ["_No data statistics in summary.json._", ""]
    rows = []
    for key, value in stats.items():
        if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
            rows += [(f"{key}.{k}", _cell(v)) for k, v in value.items()]
        else:
            rows.append((str(key), _cell(value)))
    return lines + _table(("statistic", "value"), rows) + [""]


def _eval_section(evals: dict[str, dict[str, Any]], missing: list[str]) -> list[str]:
    lines = ["## Before / after training", ""]
    before, after = evals["before"], evals["after"]
    if not before and not after:
        missing.append("evaluations: none found (eval disabled, or the run stopped before the first one)")
        return lines + ["_No evaluation was recorded._", ""]
    if not after:
        missing.append("after-training evaluation: none (the run stopped early or was interrupted)")
    if not before:
        missing.append("before-training evaluation: none")
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
    header = (
        "split",
        "ppl before",
        "ppl after",
        "change",
        "bits/byte before",
        "bits/byte after",
        "tokens scored",
    )
    lines += _table(header, rows)
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
    """Write ``RUN_DIR/report.md`` and ``RUN_DIR/plots/{loss,lr}.png``; return the report's path.

    Works on whatever the run left behind: missing or partial pieces (no summary.json after a crash, no
    after-training evaluation after an early stop, a cut-short last metrics line) are listed under
    "Missing" in the report. Raises :class:`RunDirError` when ``run_dir`` is not a directory.

    Example::

        path = write_report("runs/demo")      # also: lora-dapt report runs/demo
        print(path.read_text())
    """
    root = _run_dir(run_dir)
    missing: list[str] = []
    rows = load_metrics(root)
    if not (root / "metrics.jsonl").is_file():
        missing.append("`metrics.jsonl`: not found, so there are no curves")
    summary = _read_json(root / "summary.json", missing)
    config = _read_config(root / "config.yaml", missing)
    train_rows = sorted(
        (r for r in rows if r.get("type") == "train"),
        key=lambda r: (r.get("step") or 0, r.get("tokens") or 0),
    )
    eval_rows = [r for r in rows if r.get("type") == "eval"]
    if rows and not train_rows:
        missing.append("training rows in metrics.jsonl: none (the run stopped before the first logged step)")

    plots_dir = root / "plots"
    loss_png = plot_loss(train_rows, eval_rows, plots_dir / "loss.png", summary.get("tokens_trained"))
    lr_png = plot_lr(train_rows, plots_dir / "lr.png")
    if loss_png is None:
        missing.append("loss plot: no train or eval losses to draw")
    if lr_png is None:
        missing.append("learning-rate plot: no learning rates logged")

    if summary.get("stopped"):
        status = f"stopped early: {summary['stopped']}"
    elif summary:
        status = "finished"
    else:
        status = "incomplete (no summary.json: still running, crashed or interrupted)"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    header = [f"# Run report: {root.name}", "", f"- run directory: `{root}`", f"- status: {status}"]
    header += [f"- generated: {generated} by `lora-dapt report`", ""]
    lines = _eval_section(_evals_by_phase(summary, rows), missing)
    lines += _training_section(summary, train_rows)
    lines += ["## Plots", ""]
    for png, title in ((loss_png, "loss"), (lr_png, "learning rate")):
        if png is not None:
            lines += [f"![{title}](plots/{png.name})", ""]
    lines += _samples_section(_samples(summary))
    lines += _data_section(summary.get("data_stats"))
    lines += _config_section(config)
    if missing:  # near the top: what the reader must know before trusting the numbers below
        header += ["## Missing", "", *(f"- {m}" for m in missing), ""]
    lines = header + lines

    out = root / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    log.info("report written: %s%s", out, f" ({len(missing)} pieces missing)" if missing else "")
    return out
