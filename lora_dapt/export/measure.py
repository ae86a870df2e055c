"""Scoring the models a merge compares: held-out loss (the one causal-LM scorer) and a window of logits.

Every model of the comparison sees the same token sequences, one text per forward pass (no padding, no
packing), so the numbers differ only by what the models compute. The loss is summed by
:func:`lora_dapt.model.loss.causal_lm_loss_sum`, the scorer training and evaluation use; the full logits of
the first ``compare_tokens`` positions are kept on the CPU in float32 ([compare_tokens, vocab]: a few MB
even for a 128K vocabulary) to compare models position by position without holding every logit.

:func:`update_rounding` says how much of the LoRA update survives rounding ``W + BA`` to a dtype, and
:func:`dtype_candidates` which dtypes a merge tries (``MergeConfig.dtype = 'auto'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MergeError
from ..model.loss import causal_lm_loss_sum
from .report import LossResult

FALLBACK_TEXTS = (
    "The committee reviewed the proposal in detail and asked for a revised budget before the next meeting.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower there.",
    "She opened the manual, found the section on calibration, and followed each step carefully.",
    "In 1969 the first crewed landing on the Moon was watched by millions of people around the world.",
)
"""Used when no held-out texts are given: generic prose, so the check still runs (and catches a broken
merge) though it says little about the domain."""


def eval_sequences(tokenizer: Any, texts: Sequence[str], max_tokens: int, max_len: int) -> list[torch.Tensor]:
    """Token ids of ``texts``, one 1-D tensor per text cut to ``max_len``, until ``max_tokens`` next-token
    targets are collected; texts of fewer than 2 tokens (nothing to predict) are skipped.

    Example: texts of 10 and 30 tokens with ``max_tokens=20`` give sequences of 10 and 12 tokens (9 + 11
    targets).
    """
    out: list[torch.Tensor] = []
    total = 0
    for text in texts:
        if total >= max_tokens:
            break
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0][: min(max_len, max_tokens - total + 1)]
        if len(ids) >= 2:
            out.append(ids)
            total += len(ids) - 1
    return out


@torch.no_grad()
def score(model: Any, sequences: list[torch.Tensor], compare_tokens: int) -> tuple[LossResult, torch.Tensor]:
    """Mean next-token loss of ``model`` over ``sequences``, and the float32 CPU logits of the first
    ``compare_tokens`` positions ([compare_tokens, vocab], fewer when the text is shorter).

    The logits come from a forward pass over just the prefix each sequence contributes: a causal model's
    logits at those positions do not depend on what follows.
    """
    model.eval()
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    nll = 0.0
    count = 0
    kept: list[torch.Tensor] = []
    n_kept = 0
    for ids in sequences:
        x = ids[None].to(device)  # [1, T]
        loss_sum, n = causal_lm_loss_sum(model, x, x)  # labels = ids: every next token is a target
        nll += float(loss_sum)
        count += n
        if n_kept < compare_tokens:
            k = min(len(ids), compare_tokens - n_kept)
            kept.append(model(input_ids=x[:, :k]).logits[0].float().cpu())  # [k, vocab]
            n_kept += k
    loss = nll / max(count, 1)
    ppl = math.exp(loss) if loss < 700 else float("inf")
    return LossResult(loss, ppl, count), torch.cat(kept) if kept else torch.zeros(0)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| of two models' kept logits (0 for empty ones); MergeError when their shapes differ."""
    if a.shape != b.shape:
        raise MergeError(f"logit shapes differ between models: {list(a.shape)} vs {list(b.shape)}")
    return float((a - b).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Which dtype can hold the merged weights
# ---------------------------------------------------------------------------------------------------------------

WIDER: dict[str, tuple[str, ...]] = {
    "bfloat16": ("float16", "float32"),
    "float16": ("float32",),
    "float32": (),
}
"""The dtypes tried after each one, narrowest first: float16 has 3 more mantissa bits than bfloat16 (so it keeps
updates that bfloat16 rounds away) but a range of only +-65504."""

FP16_MAX = 65504.0
"""Largest finite float16 value."""


def model_dtype(config: Any) -> str:
    """The dtype a checkpoint's config says its weights are stored in ('bfloat16', 'float16', 'float32');
    'float32' when it says nothing (or names another dtype)."""
    # dtype first: reading torch_dtype of a transformers 5 config logs a deprecation warning
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else ""
    return name if name in WIDER else "float32"


def dtype_candidates(requested: str, base_dtype: str) -> list[str]:
    """The dtypes a merge tries, in order: ``requested`` (the base's own for 'auto'), then the wider ones.

    Example: ``dtype_candidates("auto", "bfloat16") == ["bfloat16", "float16", "float32"]``.
    """
    first = base_dtype if requested == "auto" else requested
    return [first, *WIDER[first]]


@dataclass
class UpdateRounding:
    """What rounding ``W + BA`` to a dtype does to the LoRA update, over the LoRA layers of a model.

    Per layer: erased = ||round(W + BA) - W - BA|| / ||BA|| (Frobenius norms, computed in float32 from the
    16-bit base weight W and the adapter's update BA, scaling included): 0 when the merged weight keeps the
    update exactly, about 1 when rounding gave W back.
    """

    share_erased: float
    """sqrt(sum of the layers' ||error||^2) / sqrt(sum of their ||BA||^2): the update's norm lost, overall."""
    layers: int
    """LoRA layers measured."""
    layers_mostly_erased: int
    """Layers that lost more than half of their update."""
    worst_layer: str | None
    worst_share: float
    max_abs_weight: float
    """Largest |weight| of the merged model (merged LoRA layers and every other parameter)."""


@torch.no_grad()
def update_rounding(peft_model: Any, dtype: torch.dtype) -> UpdateRounding:
    """Measure :class:`UpdateRounding` of ``peft_model``'s active adapter for ``dtype``, before merging (one
    layer's float32 copy at a time)."""
    from peft.tuners.lora import LoraLayer

    err2 = delta2 = 0.0
    layers = mostly = 0
    worst, worst_share, max_abs = None, 0.0, 0.0
    lora_weights: set[int] = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base_w = getattr(module.get_base_layer(), "weight", None)
        if base_w is None:
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            delta = module.get_delta_weight(adapter).float()  # [out, in], scaling included
            w = base_w.float()
            merged = w + delta
            max_abs = max(max_abs, float(merged.abs().max()))
            err = float((merged.to(dtype).float() - w - delta).norm())
            d = float(delta.norm())
            del delta, merged, w
            layers += 1
            err2 += err**2
            delta2 += d**2
            share = err / d if d > 0 else 0.0
            mostly += share > 0.5
            if share >= worst_share:
                worst, worst_share = name.removeprefix("base_model.model."), share
        lora_weights.add(id(base_w))
    for pname, p in peft_model.named_parameters():
        if ".lora_" not in pname and id(p) not in lora_weights and p.is_floating_point() and p.numel():
            max_abs = max(max_abs, float(p.detach().abs().max()))
    share_erased = math.sqrt(err2) / math.sqrt(delta2) if delta2 > 0 else 0.0
    return UpdateRounding(share_erased, layers, mostly, worst, worst_share, max_abs)
