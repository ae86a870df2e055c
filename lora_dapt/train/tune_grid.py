"""The search of ``lora-dapt tune`` as data and pure functions: its options (:class:`TuneConfig`), the grid
(:func:`make_grid`), the per-trial budget, the rows it records and :func:`choose`, the rule that picks one.

Nothing here loads a model or touches a file: :mod:`lora_dapt.train.tune` runs the trials.
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .._sections import Section, positive
from ..config import RunConfig
from ..errors import ConfigError
from .schedule import total_optimizer_steps

log = logging.getLogger("lora_dapt")

DEFAULT_FORGETTING_BUDGET = 0.05
"""The forgetting budget when neither the tune options nor ``eval.max_general_ppl_increase`` set one: general
perplexity may rise by at most 5% over the base's."""
BUDGET_SHARE = 0.25
"""Default ``budget_tokens``: this share of the run's own training tokens (at least :data:`MIN_PROBE_STEPS`
optimizer steps of the largest tokens per step, at most the training set)."""
MIN_PROBE_STEPS = 4


@dataclass
class TuneConfig(Section):
    """What ``lora-dapt tune`` searches and how long each probe is (its own options, not a RunConfig section)."""

    _section = "tune"

    learning_rates: list[float] = field(default_factory=list)
    """Learning rates to try; empty: ``trials`` points log-spaced from train.learning_rate / lr_span to
    train.learning_rate x lr_span."""
    trials: int = 5
    """Points of the learning-rate grid (when learning_rates is empty). Trials in all: learning rates x ranks x
    tokens_per_step."""
    lr_span: float = 4.0
    """The default grid spans the config's learning rate divided and multiplied by this (> 1)."""
    ranks: list[int] = field(default_factory=list)
    """LoRA ranks to try; empty: adapter.r only. alpha follows the rank (alpha/r kept; with use_rslora alpha
    stays, since alpha/sqrt(r) is what keeps ranks comparable there)."""
    tokens_per_step: list[int] = field(default_factory=list)
    """Tokens per optimizer step to try (multiples of train.batch_size x data.seq_len; the accumulation steps
    follow); empty: the config's."""
    budget_tokens: int | None = None
    """Training tokens per trial (the same first blocks for every trial); None: a quarter of the run's tokens,
    at least 4 optimizer steps, at most the training set."""
    max_eval_tokens: int = 20_000
    """Tokens scored per split (held-out domain, general) for every trial and the base."""
    max_general_ppl_increase: float | None = None
    """The forgetting budget of the choice; None: eval.max_general_ppl_increase, else 0.05 (5%)."""
    score_on: str = "original"
    """What trials are scored on: 'original' (the original 16-bit model with each trial's adapter on it, what
    the merge ships; loaded once for the whole tune, when it fits beside the 4-bit base, else the base as
    trained, with a warning) or 'as_trained' (the 4-bit base the adapters train on)."""
    output_dir: str | None = None
    """The tune directory; None: TRAIN_OUTPUT_DIR/tune."""
    overwrite: bool = False
    """Discard an earlier tune in output_dir (without it, a rerun resumes it: same plan only)."""

    def problems(self) -> list[str]:
        out: list[str] = []
        self._check(out, all(positive(x) for x in self.learning_rates), "learning_rates", "each must be > 0")
        self._check(out, self.trials >= 1, "trials", "must be >= 1")
        self._check(out, self.lr_span > 1 and math.isfinite(self.lr_span), "lr_span", "must be > 1")
        self._check(out, all(r >= 1 for r in self.ranks), "ranks", "each must be >= 1")
        self._check(out, all(t >= 1 for t in self.tokens_per_step), "tokens_per_step", "each must be >= 1")
        self._check(
            out,
            self.budget_tokens is None or self.budget_tokens >= 1,
            "budget_tokens",
            "must be >= 1 or null",
        )
        self._check(out, self.max_eval_tokens >= 2, "max_eval_tokens", "must be >= 2")
        self._check(
            out, self.score_on in ("original", "as_trained"), "score_on", "must be original or as_trained"
        )
        self._check(
            out, positive(self.max_general_ppl_increase), "max_general_ppl_increase", "must be > 0 or null"
        )
        return out


@dataclass(frozen=True)
class Trial:
    """One point of the grid."""

    index: int
    """Its number in this grid (the table's 'trial')."""
    learning_rate: float
    r: int
    alpha: float
    gradient_accumulation_steps: int
    tokens_per_step: int

    @property
    def name(self) -> str:
        """Its directory under ``TUNE_DIR/trials``: named by its settings, so a changed grid never reuses it."""
        return f"lr{self.learning_rate:.4g}-r{self.r}-t{self.tokens_per_step}"

    def key(self) -> dict[str, Any]:
        """What identifies the trial in ``trials.jsonl`` (its index may move when the grid changes)."""
        return {
            "learning_rate": self.learning_rate,
            "r": self.r,
            "alpha": self.alpha,
            "tokens_per_step": self.tokens_per_step,
        }


@dataclass
class TrialResult:
    """A finished trial: one row of ``trials.jsonl``."""

    trial: int
    learning_rate: float
    r: int
    alpha: float
    tokens_per_step: int
    status: str
    """'done', or 'failed' (training raised a TrainingError: a non-finite loss, say; see ``error``)."""
    steps: int = 0
    tokens: int = 0
    tokens_per_s: float = 0.0
    train_loss: float | None = None
    domain: dict[str, Any] = field(default_factory=dict)
    """The held-out domain EvalResult (as a dict) after training."""
    general: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    wall_s: float = 0.0

    @property
    def key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("learning_rate", "r", "alpha", "tokens_per_step")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TuneResult:
    """What :func:`tune` found; ``table()`` is what ``lora-dapt tune`` prints."""

    output_dir: str
    base: dict[str, Any]
    """The base model's scores: ``{"domain": EvalResult dict, "general": ...}``."""
    trials: list[TrialResult]
    budget: float
    """The forgetting budget applied (0.05: general perplexity may rise by 5%)."""
    budget_tokens: int
    """Training tokens of each trial."""
    chosen: int | None
    """The chosen trial's number; None when no trial stayed inside the budget."""
    chosen_config: str | None = None
    results_path: str | None = None
    plot_path: str | None = None
    cost: str = ""
    """The cost stated before the trials started."""
    signal: str | None = None
    """A signal that stopped the tune (the unfinished trial runs again on a rerun)."""
    scored_on: str = "as_trained"
    """What the base's and the trials' figures are on: 'original_16bit' or 'as_trained' (the 4-bit base)."""

    def table(self) -> str:
        from .tune_report import format_table  # matplotlib-free, but not needed to build a result

        return format_table(self)

    def exit_status(self) -> int:
        """0 with a choice, 3 without one (no trial inside the forgetting budget), 128 + signal number."""
        if self.signal is not None:
            return 128 + int(signal.Signals[self.signal])
        return 0 if self.chosen is not None else 3


# ---------------------------------------------------------------------------------------------------------
# The grid, the budget, the choice (pure)
# ---------------------------------------------------------------------------------------------------------


def learning_rate_grid(center: float, n: int, span: float) -> list[float]:
    """``n`` learning rates log-spaced from ``center / span`` to ``center * span`` (just ``center`` for n=1).

    >>> learning_rate_grid(2e-4, 5, 4.0)
    [5e-05, 0.0001, 0.0002, 0.0004, 0.0008]
    """
    if n == 1:
        return [center]
    return [float(f"{center * span ** (2 * i / (n - 1) - 1):.6g}") for i in range(n)]


def make_grid(config: RunConfig, options: TuneConfig, seq_len: int) -> list[Trial]:
    """Every trial: ranks x tokens per step x learning rates, in that nesting order."""
    t, a = config.train, config.adapter
    lrs = options.learning_rates or learning_rate_grid(t.learning_rate, options.trials, options.lr_span)
    micro = t.batch_size * seq_len
    steps = options.tokens_per_step or [micro * t.gradient_accumulation_steps]
    bad = [s for s in steps if s % micro]
    if bad:
        raise ConfigError(
            f"tune.tokens_per_step = {bad}: each must be a multiple of train.batch_size x data.seq_len = {micro} "
            "(tokens per step = batch_size x gradient_accumulation_steps x seq_len)"
        )
    trials = []
    for r in options.ranks or [a.r]:
        alpha = a.alpha if a.use_rslora else a.alpha * r / a.r
        for tokens in steps:
            for lr in lrs:
                trials.append(Trial(len(trials), float(lr), r, float(alpha), tokens // micro, tokens))
    return trials


def budget_blocks(
    config: RunConfig, options: TuneConfig, trials: list[Trial], n_train: int, seq_len: int
) -> int:
    """Training blocks every trial trains on (see :attr:`TuneConfig.budget_tokens`)."""
    if options.budget_tokens is not None:
        wanted = math.ceil(options.budget_tokens / seq_len)
    else:
        per_step = config.train.batch_size * config.train.gradient_accumulation_steps
        run_blocks = total_optimizer_steps(n_train, config.train, seq_len) * per_step
        largest = max(t.tokens_per_step for t in trials) // seq_len
        wanted = max(math.ceil(BUDGET_SHARE * run_blocks), MIN_PROBE_STEPS * largest)
    if wanted > n_train:
        log.warning(
            "tune: %s tokens per trial asked, the training set holds %s (%d blocks): each trial trains on all of it",
            f"{wanted * seq_len:,}",
            f"{n_train * seq_len:,}",
            n_train,
        )
    return max(1, min(wanted, n_train))


def forgetting_budget(options: TuneConfig, config: RunConfig) -> float:
    """The budget the choice applies: the tune option, else eval.max_general_ppl_increase, else
    :data:`DEFAULT_FORGETTING_BUDGET`.

    >>> from lora_dapt.config import EvalConfig
    >>> forgetting_budget(TuneConfig(max_general_ppl_increase=0.02), RunConfig(eval=EvalConfig(max_general_ppl_increase=0.1)))
    0.02
    >>> forgetting_budget(TuneConfig(), RunConfig(eval=EvalConfig(max_general_ppl_increase=0.1)))
    0.1
    >>> forgetting_budget(TuneConfig(), RunConfig())
    0.05
    """
    for budget in (options.max_general_ppl_increase, config.eval.max_general_ppl_increase):
        if budget is not None:
            return budget
    return DEFAULT_FORGETTING_BUDGET


def probe_blocks(train: Any, n_blocks: int, seed: int) -> Any:
    """The ``n_blocks`` training blocks every trial trains on: a sample drawn with ``seed`` (a
    ``datasets.Dataset`` view), not the first blocks, which packing order fills with a few documents and
    which hold no replay or other mixture component (those are packed after the domain).

    >>> import datasets
    >>> ds = datasets.Dataset.from_dict({"i": list(range(100))})
    >>> probe = probe_blocks(ds, 10, seed=42)
    >>> len(probe), probe["i"] == probe_blocks(ds, 10, seed=42)["i"], probe["i"] == list(range(10))
    (10, True, False)
    """
    n = min(n_blocks, len(train))
    if n >= len(train):
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train.select(sorted(int(i) for i in order))


def forgetting_of(row: TrialResult, base: dict[str, Any]) -> float | None:
    """Relative change of general perplexity against the base (0.03: 3% higher); None when not measured."""
    b, a = (base.get("general") or {}).get("ppl"), row.general.get("ppl")
    return None if b is None or a is None else a / b - 1


def choose(rows: list[TrialResult], base: dict[str, Any], budget: float) -> int | None:
    """The trial number with the lowest domain perplexity among the finished trials whose general perplexity
    rose by at most ``budget``; ties go to the earlier trial; None when no trial qualifies.

    >>> base = {"general": {"ppl": 10.0}}
    >>> rows = [TrialResult(0, 1e-4, 8, 16, 64, "done", domain={"ppl": 9.0}, general={"ppl": 10.2}),
    ...         TrialResult(1, 1e-3, 8, 16, 64, "done", domain={"ppl": 6.0}, general={"ppl": 12.0})]
    >>> choose(rows, base, 0.05)
    0
    """
    inside = [
        r
        for r in rows
        if r.status == "done"
        and isinstance(r.domain.get("ppl"), (int, float))
        and math.isfinite(r.domain["ppl"])
        and (f := forgetting_of(r, base)) is not None
        and f <= budget
    ]
    return min(inside, key=lambda r: (r.domain["ppl"], r.trial)).trial if inside else None


def chosen_run_config(config: RunConfig, trial: Trial) -> RunConfig:
    """The input config with the trial's learning rate, rank, alpha and accumulation steps."""
    return RunConfig(
        model=config.model,
        adapter=config.adapter.replace(r=trial.r, alpha=trial.alpha),
        data=config.data,
        train=config.train.replace(
            learning_rate=trial.learning_rate, gradient_accumulation_steps=trial.gradient_accumulation_steps
        ),
        eval=config.eval,
        merge=config.merge,
        sft=config.sft,
    )


def warmup_share(config: RunConfig, n_train: int, seq_len: int) -> float:
    """The run's warmup as a fraction of its optimizer steps (warmup_steps over the run's length, or
    warmup_ratio): what keeps a probe's schedule the run's shape.

    >>> from lora_dapt.config import TrainConfig
    >>> warmup_share(RunConfig(train=TrainConfig(warmup_steps=10, max_steps=100)), 1000, 64)
    0.1
    """
    t = config.train
    if not t.warmup_steps:
        return t.warmup_ratio
    return min(t.warmup_steps / total_optimizer_steps(n_train, t, seq_len), 0.99)
