"""What a merge measured: :class:`MergeReport`, written as ``merge_report.json`` into the merged model.

The report compares three models on the same held-out text (names as in the printed summary):

(a) the adapter on the 4-bit base, as it was trained (only when the base was quantized in training);
(b) the adapter on the 16-bit base the merge goes into (the 'original' checkpoint, or its 'dequantized'
    4-bit weights);
(c) the merged model, reloaded from disk with plain transformers.

(b) vs (c) is the check (the merge kept the adapter); (a) vs (b) says what reloading in 16-bit costs, and
:func:`compare_bases` turns the losses into advice on ``base_source``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class LossResult:
    """Mean next-token loss over the held-out tokens, and its perplexity."""

    loss: float
    perplexity: float
    tokens: int


@dataclass
class DtypeTrial:
    """One dtype a merge tried: the model merged in it (in memory) against the adapter on the base in it."""

    dtype: str
    passed: bool
    max_abs_logit_diff: float | None = None
    allowed_logit_diff: float | None = None
    """tolerance x the logit scale."""
    perplexity_adapter: float | None = None
    perplexity_merged: float | None = None
    ppl_rel_diff: float | None = None
    """|ppl(merged) / ppl(adapter) - 1|."""
    update_erased: float | None = None
    """Share of the LoRA update's norm that rounding W + BA to this dtype erased (see
    :class:`~lora_dapt.export.measure.UpdateRounding`)."""
    lora_layers: int = 0
    layers_mostly_erased: int = 0
    """LoRA layers that lost more than half of their update in this dtype."""
    worst_layer: str | None = None
    worst_layer_erased: float | None = None
    skipped: str | None = None
    """Why this dtype was not tried (float16: a merged weight beyond its range), else None."""

    def describe(self) -> str:
        """One line: what this dtype did to the update and the logits."""
        if self.skipped:
            return f"{self.dtype}: not tried ({self.skipped})"
        return (
            f"{self.dtype}: {'pass' if self.passed else 'FAIL'}, max |logit diff| {self.max_abs_logit_diff:.3g} "
            f"(allowed {self.allowed_logit_diff:.3g}), ppl {self.perplexity_merged:.4f} merged vs "
            f"{self.perplexity_adapter:.4f} adapter; rounding erased {100 * (self.update_erased or 0):.1f}% of "
            f"the update ({self.layers_mostly_erased} of {self.lora_layers} LoRA layers lost over half)"
        )


def dtype_reason(requested: str, chosen: str, trials: list[DtypeTrial]) -> str:
    """Why the merged model is saved in ``chosen``: a sentence for the report and the summary.

    Example: "auto: bfloat16 rounding erased 93% of the update in these layers (14 of 14 LoRA layers lost
    over half; max |logit diff| 1.31 > 0.3 allowed); saved as float16"."""
    failed = [t for t in trials if not t.passed and t.dtype != chosen]
    why = "; ".join(
        t.describe()
        if t.skipped
        else f"{t.dtype} rounding erased {100 * (t.update_erased or 0):.0f}% of the update in these layers "
        f"({t.layers_mostly_erased} of {t.lora_layers} LoRA layers lost over half; max |logit diff| "
        f"{t.max_abs_logit_diff:.3g} vs {t.allowed_logit_diff:.3g} allowed, ppl {t.perplexity_merged:.4f} vs "
        f"{t.perplexity_adapter:.4f})"
        for t in failed
    )
    kept = next((t for t in trials if t.dtype == chosen), None)
    if requested != "auto":
        return f"dtype {chosen} as requested" + (f"; {why}" if why else "")
    if not failed:
        return f"auto: the base's own dtype {chosen} keeps the update" + (
            f" (rounding erased {100 * (kept.update_erased or 0):.1f}% of it)" if kept else ""
        )
    return f"auto: {why}; saved as {chosen}"


LOSS_LABELS = {
    "adapter_4bit_as_trained": "(a) adapter on 4-bit base, as trained",
    "adapter_16bit_original": "(b) adapter on original 16-bit base",
    "adapter_16bit_dequantized": "(b) adapter on dequantized 16-bit base",
    "merged": "(c) merged model, reloaded without peft",
}
"""The keys of :attr:`MergeReport.losses`, in the order the summary prints them."""


@dataclass
class MergeReport:
    """What :func:`~lora_dapt.export.merge.merge_adapter` measured; written to ``OUTPUT/merge_report.json``."""

    passed: bool
    base: str
    base_name: str
    """The base as the user named it in training (a .gguf file's path for a GGUF base)."""
    resolved_base: str
    adapter_dir: str
    output_dir: str
    dtype: str
    """The dtype the merged model is saved in (for 'auto', the one chosen)."""
    dtype_requested: str
    """MergeConfig.dtype: 'auto' or a dtype name."""
    dtype_reason: str
    dtype_trials: list[DtypeTrial]
    """Every dtype tried, in order (an explicit dtype that failed is followed by the wider ones measured)."""
    base_source: str
    trained_quantization: str
    eval_source: str
    eval_texts: int
    eval_tokens: int
    losses: dict[str, LossResult | None]
    """'adapter_4bit_as_trained', 'adapter_16bit_original', 'adapter_16bit_dequantized', 'merged'."""
    max_abs_logit_diff: float
    """max |logit| difference between the adapter on the 16-bit base and the reloaded merged model."""
    logit_scale: float
    """max |logit| of the adapter on the 16-bit base (at least 1); the tolerance is relative to it."""
    tolerance: float
    perplexity_adapter: float
    """Held-out perplexity of the adapter on the 16-bit base (b), in the saved dtype."""
    perplexity_merged: float
    """Held-out perplexity of the reloaded merged model (c)."""
    ppl_rel_diff: float
    """|perplexity_merged / perplexity_adapter - 1|."""
    ppl_tolerance: float
    adapter_effect: float
    """max |logit| difference between the 16-bit base with and without the adapter (what the merge must keep)."""
    max_abs_logit_diff_4bit_vs_16bit: float | None
    trained_embeddings: bool
    tied_embeddings: bool
    closer_to_trained: str | None
    lower_loss: str | None
    advice: str
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few readable lines (printed by ``merge_adapter``)."""

        def fmt(r: LossResult | None) -> str:
            return "not measured" if r is None else f"loss {r.loss:.4f}  ppl {r.perplexity:.3f}"

        lines = [
            f"merge {'PASSED' if self.passed else 'FAILED'}: {self.adapter_dir} + {self.base} -> {self.output_dir}",
            f"  held-out text: {self.eval_texts} texts, {self.eval_tokens} tokens ({self.eval_source})",
        ]
        for key, label in LOSS_LABELS.items():
            if self.losses.get(key) is not None:
                lines.append(f"  {label:<42} {fmt(self.losses[key])}")
        lines.append(
            f"  max |logit diff| (b) vs (c): {self.max_abs_logit_diff:.3g} "
            f"(allowed {self.tolerance:g} x scale {self.logit_scale:.3g}; the adapter moves logits by up to "
            f"{self.adapter_effect:.3g})"
        )
        lines.append(
            f"  held-out perplexity: merged {self.perplexity_merged:.4f} vs adapter {self.perplexity_adapter:.4f} "
            f"(relative difference {self.ppl_rel_diff:.2g}, allowed {self.ppl_tolerance:g})"
        )
        lines.append(f"  dtype {self.dtype}: {self.dtype_reason}")
        if len(self.dtype_trials) > 1:
            lines.extend(f"    tried {t.describe()}" for t in self.dtype_trials)
        if self.max_abs_logit_diff_4bit_vs_16bit is not None:
            lines.append(f"  max |logit diff| (a) vs (b): {self.max_abs_logit_diff_4bit_vs_16bit:.3g}")
        lines.append(f"  {self.advice}")
        lines.extend(f"  problem: {p}" for p in self.problems)
        return "\n".join(lines)


def compare_bases(
    losses: dict[str, LossResult | None], base_source: str, quantization: str | None
) -> tuple[str | None, str | None, str]:
    """(base_source closer to the trained model, base_source with the lower loss, a sentence saying so).

    The adapter on the dequantized base computes what the 4-bit forward pass computed, so when it was not
    measured the 4-bit loss (a) stands in for it. Without a 4-bit measurement (a 16-bit training run) there
    is nothing to choose: (None, None, a sentence saying so).
    """
    trained = losses.get("adapter_4bit_as_trained")
    original = losses.get("adapter_16bit_original")
    deq = losses.get("adapter_16bit_dequantized") or trained
    if trained is None or original is None or deq is None:
        return None, None, "the adapter was trained on a 16-bit base: base_source does not matter"
    d_orig = abs(original.loss - trained.loss)
    d_deq = abs(deq.loss - trained.loss)
    closer = "dequantized" if d_deq <= d_orig else "original"
    lower = "dequantized" if deq.loss <= original.loss else "original"
    advice = (
        f"as trained ({quantization}): loss {trained.loss:.4f}; base_source='dequantized' gives "
        f"{deq.loss:.4f}, 'original' gives {original.loss:.4f}. '{closer}' is closer to what was trained, "
        f"'{lower}' scores better on this text (merged with '{base_source}')."
    )
    return closer, lower, advice
