"""The before / during / after evaluation of one training run (:class:`RunEvaluation`).

'before' scores the base (a resumed run reuses the scores its first session stored in ``eval_before.json``,
with what they were scored on) and, for a quantized run, the ORIGINAL 16-bit model when it fits
(:mod:`lora_dapt.evaluate.original`); 'during' runs every ``train.eval_every`` steps and checks the
forgetting budget; 'after' scores the trained adapter on the 4-bit base as trained and on the original
16-bit base (what the merge ships). Every evaluation of the model as trained logs one row per split in the
metrics log.

The forgetting budget (``eval.max_general_ppl_increase``). The during-training checks can only score the
model being trained, so they compare general perplexity with the 4-bit base's (4-bit to 4-bit). Each
evaluation inside the budget whose domain loss is the lowest so far keeps a copy of the adapter's weights
(in memory: the trainable tensors only); when an evaluation crosses the budget the run stops, and with
``eval.restore_best`` (the default) :meth:`RunEvaluation.restore_best` puts the kept weights back before
the adapter is saved, so the saved adapter and the 'after' scores are those of the best in-budget step.
After training the budget is checked once more on the 16-bit figures when the original was scored: that
is the verdict the summary gives (:class:`BudgetState`). A resumed session tracks the best from its own
evaluations on (the copy of an earlier session's best is not on disk).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import EvalConfig
from ..evaluate.forgetting import evaluate_splits
from ..evaluate.original import ORIGINAL, OriginalPlan, original_plan, score_original
from ..evaluate.score import model_device
from ..model.load import ModelSource
from ..rundir import RunDir
from .resume_config import SCORED_WITH, scored_with
from .trackers import Trackers

log = logging.getLogger("lora_dapt")

DURING_REFERENCE = "the 4-bit base (during training only the model as trained can be scored: 4-bit to 4-bit)"


def run_general_texts(texts: list[str] | None, eval_cfg: EvalConfig) -> list[str] | None:
    """The general-domain texts of the forgetting measurement: the caller's, else EvalConfig's sources or the
    built-in sample (None when general evaluation is off)."""
    if texts is not None or not (eval_cfg.general and eval_cfg.enabled):
        return texts
    from ..evaluate.forgetting import general_texts

    return general_texts(eval_cfg.general_sources or None)


@dataclass
class BudgetState:
    """The forgetting budget over one run: every check, where it was crossed, the best step inside it."""

    limit: float
    """eval.max_general_ppl_increase (0.05: general perplexity may rise 5%)."""
    reference_ppl: float | None
    """General perplexity of the base the during-training checks compare with (the 4-bit one)."""
    reference: str = DURING_REFERENCE
    checks: list[dict[str, Any]] = field(default_factory=list)
    """One per evaluation during training: step, domain_loss, general_ppl, within (the budget)."""
    crossed_at: int | None = None
    """The step whose evaluation crossed the budget (the run stopped there); None: never crossed."""
    best_step: int | None = None
    """The in-budget evaluation with the lowest domain loss (the latest one when there is no domain split)."""
    best_domain_loss: float | None = None
    best_general_ppl: float | None = None
    restored: bool = False
    """The adapter saved is the one of ``best_step`` (eval.restore_best), not the one of the crossing."""
    best_checkpoint: str | None = None
    """The checkpoint directory of ``best_step`` when one is on disk."""
    message: str | None = None
    """What happened, as logged."""
    original_16bit: dict[str, Any] | None = None
    """The verdict on the 16-bit figures after training (when the original was scored): general ppl of the
    original and of the adapter on it, the change, and whether it is within the budget."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunEvaluation:
    """The before / during / after evaluation of one run (rows go to the metrics log)."""

    model: Any
    tokenizer: Any
    eval_ds: Any
    general_texts: list[str] | None
    cfg: EvalConfig
    run: RunDir
    source: ModelSource | None = None
    """The base as loaded (for the original 16-bit model); None: no 16-bit scoring."""
    trust_remote_code: bool = False
    trackers: Trackers | None = None
    """Where the metrics-log rows also go (train.report_to), at the same steps."""
    general_before: float | None = None
    """General-text perplexity of the base: the reference of the during-training budget checks."""
    plan: OriginalPlan | None = None
    """Whether the original 16-bit model is scored (decided before training)."""
    budget: BudgetState | None = None
    probes: Any = None
    """The checked probe file (:class:`~lora_dapt.evaluate.probes.ProbeSet`), loaded at construction."""
    _best_weights: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        # bad probe rows and a missing lm-eval package fail here, before any model runs
        if self.cfg.enabled and self.cfg.probes:
            from ..evaluate.probes import load_probes

            self.probes = load_probes(self.cfg.probes)
        if self.cfg.enabled and self.cfg.lm_eval_tasks:
            from ..evaluate.lm_eval import check_lm_eval

            check_lm_eval(self.cfg.lm_eval_tasks, self.cfg.lm_eval_include_path)

    def _evaluate(self, step: int, phase: str, tokens: int = 0, model: Any = None) -> dict[str, Any]:
        out = self._evaluate_splits(step, phase, tokens, model)
        if model is None and self.trackers is not None:  # the rows just logged, to the trackers
            self.trackers.log_eval(step, out)
        return out

    def _evaluate_splits(
        self, step: int, phase: str, tokens: int, model: Any, own_tokenizer: Any = None
    ) -> dict[str, Any]:
        tokenizer, eval_ds = self.tokenizer, self.eval_ds
        if own_tokenizer is not None:  # the original without the run's new tokens: its own tokenization
            from ..data.vocab import retokenize_blocks

            tokenizer = own_tokenizer
            if eval_ds is not None and len(eval_ds) > 0:
                eval_ds = retokenize_blocks(eval_ds, self.tokenizer, own_tokenizer)
        return evaluate_splits(
            model if model is not None else self.model,
            tokenizer,
            eval_ds,
            self.general_texts,
            self.cfg,
            step=step,
            phase=phase,
            run_dir=self.run.path,
            tokens_trained=tokens,
            probes=self.probes,
            log_rows=model is None,
        )

    def _score_original(self, step: int, phase: str, tokens: int, adapter: bool) -> dict[str, Any]:
        assert self.plan is not None and self.source is not None
        return score_original(
            self.source,
            self.plan,
            lambda m, own: self._evaluate_splits(step, phase, tokens, m, own),
            device=model_device(self.model),
            adapter_dir=self.run.adapter_dir if adapter else None,
            tokenizer=self.tokenizer,
            trust_remote_code=self.trust_remote_code,
        )

    def before(self, *, resumed: bool) -> dict[str, Any]:
        """The base model's scores (and the original 16-bit model's, under ``"original_16bit"``, with the
        plan that decided it); a resumed run reuses the ones its first session measured.

        ``eval_before.json`` also records what was scored (``scored_with``: the settings and token counts),
        so the 'during' and 'after' evaluations of a resumed run score the same tokens."""
        if not self.cfg.enabled:
            return {}
        stored = self.run.read_eval_before() if resumed else None
        if stored is None:
            before = self._evaluate(0, "before")
            if self.source is not None:
                self.plan = original_plan(
                    self.source, self.cfg, model_device(self.model), trust_remote_code=self.trust_remote_code
                )
                scores = self._score_original(0, "before", 0, adapter=False) if self.plan.scored else {}
                before[ORIGINAL] = {**scores, "plan": self.plan.to_dict()}
            self.run.write_eval_before(
                {**before, SCORED_WITH: scored_with(self.cfg, before, self.general_texts)}
            )
        else:
            before = {k: v for k, v in stored.items() if k != SCORED_WITH}
            plan = (before.get(ORIGINAL) or {}).get("plan")
            if isinstance(plan, dict) and self.cfg.original_base is not False:
                self.plan = OriginalPlan(**plan)
        self.general_before = (before.get("general") or {}).get("ppl")
        if self.cfg.max_general_ppl_increase:
            self.budget = BudgetState(self.cfg.max_general_ppl_increase, self.general_before)
        return before

    def during(self, step: int, tokens: int) -> str | None:
        """Evaluate mid-run; returns why the run must stop (forgetting budget exceeded), or None. Keeps the
        adapter weights of the best evaluation inside the budget (see the module docstring)."""
        res = self._evaluate(step, "during", tokens)
        now = (res.get("general") or {}).get("ppl")
        domain = (res.get("domain") or {}).get("loss")
        b = self.budget
        if b is None:
            return None
        base, limit = b.reference_ppl, b.limit
        within = not (base and now and now > base * (1 + limit))
        b.checks.append({"step": step, "domain_loss": domain, "general_ppl": now, "within": within})
        if not within:
            b.crossed_at = step
            return (
                f"forgetting budget exceeded at step {step}: general ppl {base:.3f} -> {now:.3f} "
                f"(+{100 * (now / base - 1):.1f}% > {100 * limit:.1f}%; against the 4-bit base, as every "
                "check during training)"
            )
        if (
            b.best_step is None
            or domain is None
            or (b.best_domain_loss is not None and domain < b.best_domain_loss)
        ):
            b.best_step, b.best_domain_loss, b.best_general_ppl = step, domain, now
            self._best_weights = {
                n: p.detach().to("cpu", copy=True)
                for n, p in self.model.named_parameters()
                if p.requires_grad
            }
        return None

    def restore_best(self) -> str | None:
        """After a run the budget stopped: put back the adapter of the best in-budget evaluation
        (``eval.restore_best``) and say so; returns the message (None when the budget was not crossed)."""
        b = self.budget
        if b is None or b.crossed_at is None:
            return None
        if b.best_step is not None:
            ckpt = self.run.checkpoint_dir(b.best_step)
            b.best_checkpoint = str(ckpt) if ckpt in self.run.checkpoints() else None
        if self._best_weights is None:
            b.message = (
                f"no evaluation before step {b.crossed_at} was inside the budget (eval_every checks only): "
                "the adapter is the one of the crossing"
            )
        elif self.cfg.restore_best:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, weight in self._best_weights.items():
                    params[name].copy_(weight.to(params[name].device))
            b.restored = True
            b.message = (
                f"restored the adapter of step {b.best_step}, the best evaluation inside the budget (domain "
                f"loss {_fmt(b.best_domain_loss)}, general ppl {_fmt(b.best_general_ppl)}); the budget was "
                f"crossed at step {b.crossed_at}"
            )
        else:
            where = (
                b.best_checkpoint or "no checkpoint on disk (set train.save_every to eval_every to keep one)"
            )
            b.message = (
                f"kept the adapter of the crossing (eval.restore_best is false); the best step inside the budget "
                f"was {b.best_step} (domain loss {_fmt(b.best_domain_loss)}): {where}"
            )
        log.warning("forgetting budget: %s", b.message)
        return b.message

    def after(self, step: int, tokens: int) -> dict[str, Any]:
        """The adapter's scores on the base as trained and, when the original was scored before, on the
        original 16-bit base (the adapter saved in the run directory attached to it)."""
        if not self.cfg.enabled:
            return {}
        after = self._evaluate(step, "after", tokens)
        if self.plan is not None and self.plan.scored and self.run.has_adapter():
            after[ORIGINAL] = self._score_original(step, "after", tokens, adapter=True)
        return after

    def final_budget(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """The budget's summary entry ({} without a budget): the during-training record and, when the
        original was scored, the verdict on the 16-bit general perplexity (the figure the budget is about)."""
        b = self.budget
        if b is None:
            return {}
        ref = ((before.get(ORIGINAL) or {}).get("general") or {}).get("ppl")
        now = ((after.get(ORIGINAL) or {}).get("general") or {}).get("ppl")
        bpb = [((s.get(ORIGINAL) or {}).get("general") or {}).get("bits_per_byte") for s in (before, after)]
        if (before.get(ORIGINAL) or {}).get("tokenizer") == "base" and ref and all(bpb):
            # new tokens: 'after' counts other tokens; its perplexity per BASE token over the same bytes
            now = ref ** (bpb[1] / bpb[0])
        if ref and now:
            within = now <= ref * (1 + b.limit)
            b.original_16bit = {
                "ppl_before": ref,
                "ppl_after": now,
                "change": now / ref - 1,
                "within": within,
            }
            if not within:
                log.warning(
                    "forgetting budget: against the original 16-bit model general ppl rose %.3f -> %.3f "
                    "(+%.1f%% > %.1f%%)",
                    ref,
                    now,
                    100 * (now / ref - 1),
                    100 * b.limit,
                )
        return b.to_dict()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
