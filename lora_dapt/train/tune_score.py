"""What ``lora-dapt tune`` scores trials on (``tune.score_on``): the ORIGINAL 16-bit model or the 4-bit base.

A QLoRA adapter learns back part of the NF4 rounding, so on the 4-bit base it trained on it looks better
than it is, general text included (issue 14). What a user gains and gives up is measured against the model
they would otherwise use, the original 16-bit one, with the adapter on it (what the merge ships). With
``score_on: original`` (the default) :class:`TrialScorer` loads that model ONCE for the whole tune
(:func:`~lora_dapt.evaluate.original.load_original`, when :func:`~lora_dapt.evaluate.original.original_plan`
says it fits beside the 4-bit base), scores it as the tune's base, and for every trial attaches the adapter
the trial saved, scores it and takes it off again (peft ``unload``; the 16-bit weights are checked
bit-identical afterwards). When it does not fit, or the base is not quantized, the trials are scored on the
base as trained, and the result says so (``scored_on``).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import EvalConfig
from ..errors import TrainingError
from ..evaluate.original import ORIGINAL, OriginalPlan, load_original, original_plan
from ..rundir import RunDir

log = logging.getLogger("lora_dapt")

SCORE_ON = ("original", "as_trained")
"""``tune.score_on``: the original 16-bit model (when it fits) or the 4-bit base as trained."""
AS_TRAINED = "as_trained"


@dataclass
class TrialScorer:
    """Scores the tune's base and each trial on one reference (:attr:`scored_on`) with the same capped
    held-out domain blocks and general texts.

    Example::

        with TrialScorer.create(model, tok, eval_ds, general, eval_cfg, source, "original") as scorer:
            base = scorer.score_base(model, run)
            row = scorer.score_trial(peft_model, run.adapter_dir, run, step=4, tokens=256)
    """

    tokenizer: Any
    eval_ds: Any
    general: list[str]
    eval_cfg: EvalConfig
    plan: OriginalPlan | None = None
    """The decision on the original 16-bit model (None: not considered, score_on 'as_trained')."""
    original: Any = None
    """The original 16-bit model (without an adapter between trials); None: the base as trained."""
    fingerprint: dict[str, str] | None = None
    """The original's weights when loaded: every trial's adapter is checked off again against it."""
    _load: tuple[Any, Any, bool] | None = field(default=None, repr=False)
    """(source, device, trust_remote_code) of the original, when it is to be scored (loaded on first use)."""

    @classmethod
    def create(
        cls,
        model: Any,
        tokenizer: Any,
        eval_ds: Any,
        general: list[str],
        eval_cfg: EvalConfig,
        source: Any,
        score_on: str,
        *,
        trust_remote_code: bool = False,
    ) -> TrialScorer:
        """A scorer; for ``score_on='original'`` the original 16-bit model of ``source`` is loaded here when
        it fits (else a warning, and the trials are scored on the base as trained)."""
        scorer = cls(tokenizer, eval_ds, general, eval_cfg)
        if score_on != "original" or source is None:
            return scorer
        device = next(model.parameters()).device
        scorer.plan = original_plan(
            source, EvalConfig(original_base="auto"), device, trust_remote_code=trust_remote_code
        )
        if not scorer.plan.scored:
            log.warning(
                "tune.score_on = original: %s; trials are scored on the base as trained", scorer.plan.reason
            )
            return scorer
        scorer._load = (source, device, trust_remote_code)
        return scorer

    def _original(self) -> Any:
        """The original 16-bit model, loaded on first use (a resumed tune with nothing left to score never
        loads it)."""
        if self.original is None and self._load is not None:
            from .tune import base_fingerprint

            source, device, trust_remote_code = self._load
            log.info(
                "tune: trials are scored on the original 16-bit model (%s), loaded once", self.plan.dtype
            )
            # tune trains no new token rows, so the original's own tokenizer is the tune's
            self.original, _ = load_original(source, self.plan.dtype or "float32", device, trust_remote_code)
            self.original.eval()
            self.fingerprint = base_fingerprint(self.original)
        return self.original

    @property
    def scored_on(self) -> str:
        """``'original_16bit'`` or ``'as_trained'``: what the base's and every trial's figures are on."""
        return ORIGINAL if self._load is not None else AS_TRAINED

    def describe(self) -> dict[str, Any]:
        """For the tune's plan and result: the reference, and the original's plan when one was made."""
        return {"scored_on": self.scored_on, "original_plan": self.plan.to_dict() if self.plan else None}

    def score_base(self, model: Any, run: RunDir) -> dict[str, Any]:
        """The base's scores on the reference (the 4-bit ``model``'s rows go to ``run``'s metrics log)."""
        if self._load is None:
            return self._score(model, run, step=0, phase="before")
        return self._score(self._original(), run, step=0, phase="before", log_rows=False)

    def score_trial(
        self, peft_model: Any, adapter_dir: Path, run: RunDir, *, step: int, tokens: int
    ) -> dict[str, Any]:
        """A trained trial's scores: ``peft_model`` as trained, or its saved adapter (``adapter_dir``) on the
        original 16-bit model, taken off again after scoring."""
        if self._load is None:
            return self._score(peft_model, run, step=step, phase="after", tokens=tokens)
        from peft import PeftModel

        from ..model.lora import peft_wrapping
        from .tune import base_fingerprint

        with peft_wrapping():  # peft reads a deprecated transformers property (one FutureWarning)
            attached = PeftModel.from_pretrained(self._original(), str(adapter_dir), is_trainable=False)
        try:
            return self._score(attached, run, step=step, phase="after", tokens=tokens, log_rows=False)
        finally:
            self.original = attached.unload()
            del attached
            if base_fingerprint(self.original) != self.fingerprint:
                raise TrainingError(
                    "tune: taking a trial's adapter off the original 16-bit model changed its weights; later "
                    "trials would be scored on another model. This is a bug; please report it with your config"
                )

    def _score(
        self, model: Any, run: RunDir, *, step: int, phase: str, tokens: int = 0, log_rows: bool = True
    ) -> dict[str, Any]:
        from ..evaluate.forgetting import evaluate_splits

        out = evaluate_splits(
            model,
            self.tokenizer,
            self.eval_ds,
            self.general,
            self.eval_cfg,
            step=step,
            phase=phase,
            run_dir=run.create().path,
            tokens_trained=tokens,
            log_rows=log_rows,
        )
        return {"domain": out["domain"], "general": out["general"]}

    def close(self) -> None:
        """Free the original 16-bit model."""
        if self.original is not None:
            self.original = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self) -> TrialScorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
