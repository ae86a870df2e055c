"""The before / during / after evaluation of one training run (:class:`RunEvaluation`).

'before' scores the base (a resumed run reuses the scores its first session stored in ``eval_before.json``,
with what they were scored on), 'during' runs every ``train.eval_every`` steps and checks the forgetting
budget, 'after' scores the trained adapter. Every evaluation logs one row per split in the metrics log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import EvalConfig
from ..evaluate.forgetting import evaluate_splits
from ..rundir import RunDir
from .resume_config import SCORED_WITH, scored_with


def run_general_texts(texts: list[str] | None, eval_cfg: EvalConfig) -> list[str] | None:
    """The general-domain texts of the forgetting measurement: the caller's, else EvalConfig's sources or the
    built-in sample (None when general evaluation is off)."""
    if texts is not None or not (eval_cfg.general and eval_cfg.enabled):
        return texts
    from ..evaluate.forgetting import general_texts

    return general_texts(eval_cfg.general_sources or None)


@dataclass
class RunEvaluation:
    """The before / during / after evaluation of one run (rows go to the metrics log)."""

    model: Any
    tokenizer: Any
    eval_ds: Any
    general_texts: list[str] | None
    cfg: EvalConfig
    run: RunDir
    general_before: float | None = None
    """General-text perplexity of the base: the reference of the forgetting budget."""

    def _evaluate(self, step: int, phase: str, tokens: int = 0) -> dict[str, Any]:
        return evaluate_splits(
            self.model,
            self.tokenizer,
            self.eval_ds,
            self.general_texts,
            self.cfg,
            step=step,
            phase=phase,
            run_dir=self.run.path,
            tokens_trained=tokens,
        )

    def before(self, *, resumed: bool) -> dict[str, Any]:
        """The base model's scores; a resumed run reuses the ones its first session measured.

        ``eval_before.json`` also records what was scored (``scored_with``: the settings and token counts),
        so the 'during' and 'after' evaluations of a resumed run score the same tokens."""
        if not self.cfg.enabled:
            return {}
        stored = self.run.read_eval_before() if resumed else None
        if stored is None:
            before = self._evaluate(0, "before")
            self.run.write_eval_before(
                {**before, SCORED_WITH: scored_with(self.cfg, before, self.general_texts)}
            )
        else:
            before = {k: v for k, v in stored.items() if k != SCORED_WITH}
        self.general_before = (before.get("general") or {}).get("ppl")
        return before

    def during(self, step: int, tokens: int) -> str | None:
        """Evaluate mid-run; returns why the run must stop (forgetting budget exceeded), or None."""
        now = (self._evaluate(step, "during", tokens).get("general") or {}).get("ppl")
        budget, base = self.cfg.max_general_ppl_increase, self.general_before
        if budget and base and now and now > base * (1 + budget):
            return (
                f"forgetting budget exceeded at step {step}: general ppl {base:.3f} -> {now:.3f} "
                f"(+{100 * (now / base - 1):.1f}% > {100 * budget:.1f}%)"
            )
        return None

    def after(self, step: int, tokens: int) -> dict[str, Any]:
        return self._evaluate(step, "after", tokens) if self.cfg.enabled else {}
