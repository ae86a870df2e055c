"""What ``lora-dapt tune`` shows: the table of trials (printed and in ``results.md``) and the plot of domain
gain against forgetting (``tune.png``, drawn like :mod:`lora_dapt.evaluate.plots`: a matplotlib ``Figure`` on
the Agg canvas, never pyplot).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tune_grid import forgetting_of

if TYPE_CHECKING:
    from .tune_grid import TrialResult, TuneResult

HEADER = (
    "trial",
    "lr",
    "r",
    "tokens/step",
    "domain ppl before",
    "domain ppl after",
    "general ppl before",
    "general ppl after",
    "tokens/s",
    "choice",
)
"""Columns of the table."""


def _ppl(entry: dict[str, Any] | None) -> str:
    value = (entry or {}).get("ppl")
    return "-" if not isinstance(value, (int, float)) else ("inf" if math.isinf(value) else f"{value:.3f}")


def _change(after: dict[str, Any], before: dict[str, Any]) -> str:
    a, b = (after or {}).get("ppl"), (before or {}).get("ppl")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b or math.isinf(a):
        return ""
    return f" ({100 * (a / b - 1):+.1f}%)"


def verdict(row: TrialResult, result: TuneResult) -> str:
    """'chosen', 'over budget', 'failed' or '' (inside the budget, not the best domain gain)."""
    if row.status != "done":
        return "failed"
    if row.trial == result.chosen:
        return "chosen"
    f = forgetting_of(row, result.base)
    return "over budget" if f is None or f > result.budget else ""


def table_rows(result: TuneResult) -> list[tuple[str, ...]]:
    """One tuple of cells per trial, in trial order (the cells of :data:`HEADER`)."""
    base_d, base_g = result.base.get("domain") or {}, result.base.get("general") or {}
    rows = []
    for row in result.trials:
        rows.append(
            (
                str(row.trial),
                f"{row.learning_rate:.3g}",
                str(row.r),
                f"{row.tokens_per_step:,}",
                _ppl(base_d),
                _ppl(row.domain) + _change(row.domain, base_d),
                _ppl(base_g),
                _ppl(row.general) + _change(row.general, base_g),
                f"{row.tokens_per_s:,.0f}" if row.status == "done" else "-",
                verdict(row, result),
            )
        )
    return rows


def format_table(result: TuneResult) -> str:
    """An aligned Markdown table of every trial (what ``lora-dapt tune`` prints), then the choice."""
    rows = [HEADER, *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join([*lines, "", choice_line(result)])


def choice_line(result: TuneResult) -> str:
    """One sentence: the chosen trial and why, or why there is none."""
    budget = f"general perplexity at most +{100 * result.budget:.1f}% over the base"
    if result.chosen is None:
        return (
            f"no trial kept {budget}: nothing chosen. Try lower learning rates (--lr), fewer budget tokens, or a "
            "larger forgetting budget (eval.max_general_ppl_increase / --max-general-ppl-increase)"
        )
    row = next(r for r in result.trials if r.trial == result.chosen)
    return (
        f"chosen: trial {row.trial} (learning_rate {row.learning_rate:g}, r {row.r}, alpha {row.alpha:g}, "
        f"{row.tokens_per_step:,} tokens/step): the lowest held-out domain perplexity with {budget}"
    )


def format_results(result: TuneResult) -> str:
    """``results.md``: the cost, the table, the choice, and where the chosen config and the plot are."""
    parts = [
        "# lora-dapt tune",
        "",
        f"{result.cost}.",
        f"Each trial: the same first {result.budget_tokens:,} training tokens; scores on "
        + (
            "the original 16-bit model (the base, and each trial's adapter on it, as merged)"
            if result.scored_on == "original_16bit"
            else "the 4-bit base as trained"
        )
        + ", the same capped held-out domain and general tokens for every trial.",
        "",
        format_table(result),
    ]
    if result.chosen_config:
        parts += ["", f"Chosen config: `{result.chosen_config}` (`lora-dapt train {result.chosen_config}`)."]
    if result.plot_path:
        parts += ["", f"![domain gain vs forgetting]({Path(result.plot_path).name})"]
    return "\n".join(parts) + "\n"


def plot_points(result: TuneResult) -> list[tuple[int, float, float]]:
    """(trial, general ppl change %, domain ppl reduction %) of every finished trial with finite scores."""
    points = []
    base_d = (result.base.get("domain") or {}).get("ppl")
    for row in result.trials:
        d, f = row.domain.get("ppl"), forgetting_of(row, result.base)
        if row.status == "done" and base_d and isinstance(d, (int, float)) and f is not None:
            if math.isfinite(d) and math.isfinite(f):
                points.append((row.trial, 100 * f, 100 * (1 - d / base_d)))
    return points


def plot_tune(result: TuneResult, path: Path) -> list[tuple[int, float, float]]:
    """Draw domain gain (y) against forgetting (x), one point per trial (labelled with its number), the budget
    as a vertical line, the chosen trial as a star; returns the points drawn ([]: nothing drawn)."""
    points = plot_points(result)
    if not points:
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    others = [p for p in points if p[0] != result.chosen]
    chosen = [p for p in points if p[0] == result.chosen]
    ax.scatter(
        [p[1] for p in others], [p[2] for p in others], color="tab:blue", s=36, zorder=3, label="trial"
    )
    if chosen:
        ax.scatter(
            [chosen[0][1]], [chosen[0][2]], color="tab:red", marker="*", s=160, zorder=4, label="chosen"
        )
    for trial, x, y in points:
        row = next(r for r in result.trials if r.trial == trial)
        ax.annotate(
            f"{trial}: lr {row.learning_rate:.2g}, r {row.r}",
            (x, y),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.axvline(100 * result.budget, color="tab:gray", linestyle="--", linewidth=1, label="forgetting budget")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("general perplexity change vs base (%)  [forgetting]")
    ax.set_ylabel("domain perplexity reduction vs base (%)  [gain]")
    ax.set_title(f"lora-dapt tune: {len(points)} trials, {result.budget_tokens:,} tokens each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return points
