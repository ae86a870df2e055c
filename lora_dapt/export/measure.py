"""Scoring the models a merge compares: held-out loss (the one causal-LM scorer) and a window of logits.

Every model of the comparison sees the same token sequences, one text per forward pass (no padding, no
packing), so the numbers differ only by what the models compute. The loss is summed by
:func:`lora_dapt.model.loss.causal_lm_loss_sum`, the scorer training and evaluation use; the full logits of
the first ``compare_tokens`` positions are kept on the CPU in float32 ([compare_tokens, vocab]: a few MB
even for a 128K vocabulary) to compare models position by position without holding every logit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
