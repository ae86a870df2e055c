"""model.loss (split from train)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

LOSS_CHUNK_TOKENS = 1024
"""The most positions per chunk when the loss is chunked."""


LOSS_LOGITS_BUDGET = 256 * 2**20
"""Bytes of fp32 logits the loss may hold at once; above it, chunks are recomputed in the backward pass."""


def loss_chunk_tokens(vocab_size: int) -> int:
    """Positions per loss chunk: at most LOSS_CHUNK_TOKENS, and few enough that a chunk's fp32 logits stay
    within a quarter of LOSS_LOGITS_BUDGET (a 128K vocabulary gets 128-token chunks)."""
    return max(16, min(LOSS_CHUNK_TOKENS, LOSS_LOGITS_BUDGET // 4 // (4 * vocab_size)))


def loss_chunk_size(positions: int, vocab_size: int) -> int:
    """Positions the loss takes at once: all of them while their fp32 logits fit LOSS_LOGITS_BUDGET, else
    :func:`loss_chunk_tokens`."""
    return positions if positions * vocab_size * 4 <= LOSS_LOGITS_BUDGET else loss_chunk_tokens(vocab_size)


def _supports_hidden_state_loss(base: Any) -> bool:
    cfg = getattr(base, "config", None)
    if cfg is None or not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return False
    # Heads that post-process logits (soft-capping, scaling) go through the model's own forward instead.
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return True


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, for a frozen output head.

    The gradient w.r.t. ``hidden`` is computed in the forward pass, ``chunk`` positions at a time
    (``softmax - one_hot`` times the head weight), and kept; the logits of a chunk are freed before the next
    one. Autograd would instead keep every chunk's logits (or, chunked with recomputation, run the head
    twice). Backward only scales the stored gradient. The head's weight and bias get no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # noqa: D102
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if need_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.shape[0], chunk):
            y = targets[i : i + chunk]
            logp = torch.log_softmax(F.linear(hidden[i : i + chunk], weight, bias).float(), dim=-1)
            total -= logp.gather(1, y[:, None]).sum()
            if need_grad:
                logp.exp_()  # softmax, in place
                logp[torch.arange(len(y), device=y.device), y] -= 1
                grad[i : i + chunk] = logp.to(weight.dtype) @ weight
            del logp
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def _frozen_linear_head(head: Any) -> bool:
    """A plain ``nn.Linear`` output head with no trainable tensor (not LoRA-wrapped, quantized or trained)."""
    return (
        type(head) is torch.nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    )


def causal_lm_loss_sum(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose target label is not -100, and their count.

    Only hidden states of trained positions reach the output head (padding and masked prompts cost nothing
    there). When their fp32 logits fit in ``LOSS_LOGITS_BUDGET`` they are computed in one go; otherwise in
    chunks of :func:`loss_chunk_tokens` positions, so peak memory holds one chunk of logits instead of
    [batch, seq, vocab]. A frozen head (the LoRA case) gets the gradient w.r.t. the hidden states in the
    forward pass, chunk by chunk, and keeps no logits at all; a trainable or wrapped head keeps autograd's
    own path, with each chunk recomputed in the backward pass (a second pass through the head, which is why
    small batches skip chunking). Heads that post-process logits (soft-capping, scaling) go through the
    model's own forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = labels[:, 1:]  # logits[t] predicts token t+1
    keep = targets != -100
    n = int(keep.sum())
    if n == 0:
        zero = sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        return zero, 0
    if not _supports_hidden_state_loss(base):
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), n
    # use_cache=False: transformers only derives the packed-document mask from position_ids without a KV cache
    hidden = base.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    h = hidden[:, :-1][keep]  # [n, hidden]
    y = targets[keep]  # [n]
    head = base.get_output_embeddings()

    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h_chunk).float(), y_chunk, reduction="sum")

    vocab = int(getattr(base.config, "vocab_size", 0) or head.weight.shape[0])
    chunk = loss_chunk_size(n, vocab)
    if _frozen_linear_head(head):
        return _FrozenHeadCrossEntropy.apply(h, head.weight, head.bias, y, chunk), n
    if chunk >= n:
        return chunk_loss(h, y), n
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        hc, yc = h[i : i + chunk], y[i : i + chunk]
        total = total + (
            recompute(chunk_loss, hc, yc, use_reentrant=False) if h.requires_grad else chunk_loss(hc, yc)
        )
    return total, n
