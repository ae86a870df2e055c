"""The report's plots: PNG files drawn from the rows of a run's metrics log.

Plots are drawn on matplotlib ``Figure`` objects with the Agg canvas, never through pyplot, so no display
is needed and the caller's matplotlib backend is left alone. matplotlib is imported on the first plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOSS_PLOT = "loss.png"
"""File name of the loss plot in a run's plots directory."""
LR_PLOT = "lr.png"
"""File name of the learning-rate plot."""


def eval_x(row: dict[str, Any], train_rows: list[dict[str, Any]], tokens_trained: Any) -> float:
    """Tokens trained when an eval row was written, found from its step and the train rows.

    The eval row's own ``tokens`` is not trusted: logs written before :class:`~lora_dapt.rundir.EvalRow`
    built rows as ``{..., "tokens": trained, **result}``, where the ``tokens`` of
    :meth:`EvalResult.to_dict` (tokens scored) won. Tokens per step are constant with packed blocks, so
    interpolating between logged train rows is exact up to rounding.

    Example::

        >>> eval_x({"phase": "during", "step": 3}, [{"step": 2, "tokens": 200}, {"step": 4, "tokens": 400}], None)
        300.0
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
                (eval_x(r, train, tokens_trained) if by_x else float(r.get("step") or 0)),
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
