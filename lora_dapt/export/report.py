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
    resolved_base: str
    adapter_dir: str
    output_dir: str
    dtype: str
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
