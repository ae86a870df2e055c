"""The one causal-LM loss: summed next-token cross-entropy over the labelled positions, and their count.

Training (the Trainer's ``compute_loss``), evaluation and the merge check all score through
:func:`causal_lm_loss_sum`, so a reported eval loss is the training loss on other data. It returns a sum
and a count rather than a mean so that callers can average over gradient-accumulation steps, batches or
whole datasets exactly.

Trade-offs: the model's own ``model(..., labels=...)`` computes ``[batch, seq, vocab]`` logits and keeps
them (and their fp32 copy) for the backward pass: for a 128K vocabulary that is the largest tensor of a
QLoRA step. Here only the hidden states of labelled positions reach the head, in chunks when their logits
would exceed :data:`LOSS_LOGITS_BUDGET`. A frozen ``nn.Linear`` head (the LoRA case) gets its gradient
w.r.t. the hidden states in the forward pass and keeps no logits at all; a trainable or wrapped head pays a
second pass through the head per chunk in the backward pass instead. Models whose head post-processes the
logits (soft-capping, scaling) go through their own forward, which is always right but not lean.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

from .attention import packed_attention_kwargs
from .lora import base_model

LOSS_CHUNK_TOKENS = 1024
"""The most positions per chunk when the loss is chunked."""


LOSS_LOGITS_BUDGET = 256 * 2**20
"""Bytes of fp32 logits the loss may hold at once; above it, chunks are recomputed in the backward pass."""


CPU_HEAD_CHUNK_BYTES = 24 * 2**20
"""On the CPU, the frozen head's chunks hold at most this many bytes of fp32 logits: chunks that stay in the
cache run its softmax and casts about 1.6x faster than 256 MiB ones (SmolLM2's 49K vocabulary: 128 rows)."""


def cpu_head_chunk(vocab_size: int) -> int:
    """Positions per chunk of the frozen head's loss on the CPU (:data:`CPU_HEAD_CHUNK_BYTES`, at least 16).

    >>> cpu_head_chunk(49152), cpu_head_chunk(128256)
    (128, 49)
    """
    return max(16, CPU_HEAD_CHUNK_BYTES // (4 * vocab_size))


def loss_chunk_tokens(vocab_size: int) -> int:
    """Positions per loss chunk: at most LOSS_CHUNK_TOKENS, and few enough that a chunk's fp32 logits stay
    within a quarter of LOSS_LOGITS_BUDGET (a 128K vocabulary gets 128-token chunks)."""
    return max(16, min(LOSS_CHUNK_TOKENS, LOSS_LOGITS_BUDGET // 4 // (4 * vocab_size)))


def loss_chunk_size(positions: int, vocab_size: int) -> int:
    """Positions the loss takes at once: all of them while their fp32 logits fit LOSS_LOGITS_BUDGET, else
    :func:`loss_chunk_tokens`."""
    return positions if positions * vocab_size * 4 <= LOSS_LOGITS_BUDGET else loss_chunk_tokens(vocab_size)


def _supports_hidden_state_loss(base: Any) -> bool:
    """Whether ``base`` exposes a decoder and a head whose logits are plain ``head(hidden)``."""
    cfg = getattr(base, "config", None)
    if cfg is None or not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return False
    # Heads that post-process logits (soft-capping, scaling) go through the model's own forward instead.
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return True


def _head_chunk_eager(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed NLL, gradient w.r.t. ``hidden`` or None) of one chunk of the frozen head's loss, eagerly: the
    softmax and the one-hot subtraction in place on the chunk's fp32 log-probabilities."""
    logp = torch.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)
    nll = -logp.gather(1, targets[:, None]).sum()
    if not need_grad:
        return nll, None
    logp.exp_()  # softmax, in place
    logp[torch.arange(len(targets), device=targets.device), targets] -= 1
    return nll, logp.to(weight.dtype) @ weight


def _head_chunk(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_head_chunk_eager` with the gradient, written for torch.compile (no in-place updates), which fuses
    its log-softmax, exp, one-hot and casts into one pass over the logits."""
    logp = torch.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)
    nll = -logp.gather(1, targets[:, None]).sum()
    probs = logp.exp() - F.one_hot(targets, logp.shape[-1]).to(logp.dtype)
    return nll, probs.to(weight.dtype) @ weight


@functools.cache
def _compiled_head_chunk() -> Any:
    # one compile per full-chunk shape (the remainder runs eagerly), so no dynamic shapes
    return torch.compile(_head_chunk, dynamic=False)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, for a frozen output head.

    The gradient w.r.t. ``hidden`` is computed in the forward pass, ``chunk`` positions at a time
    (``softmax - one_hot`` times the head weight), and kept; the logits of a chunk are freed before the next
    one. Autograd would instead keep every chunk's logits (or, chunked with recomputation, run the head
    twice). Backward only scales the stored gradient. The head's weight and bias get no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, compiled=False):  # noqa: D102
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if need_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        # compiled: full chunks through the compiled function (one shape: one compile); the remainder, whose
        # size changes with every batch, eagerly (a shape per size would recompile without end)
        fused = _compiled_head_chunk() if compiled and need_grad else None
        full = hidden.shape[0] // chunk * chunk
        for i in range(0, hidden.shape[0], chunk):
            h, y = hidden[i : i + chunk], targets[i : i + chunk]
            if fused is not None and i < full:
                nll, g = fused(h, weight, bias, y)
            else:
                nll, g = _head_chunk_eager(h, weight, bias, y, need_grad)
            total += nll
            if need_grad:
                grad[i : i + chunk] = g
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def _frozen_linear_head(head: Any) -> bool:
    """A plain ``nn.Linear`` output head with no trainable tensor (not LoRA-wrapped, quantized or trained)."""
    return (
        type(head) is torch.nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    )


def causal_lm_loss_sum(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    compiled_head: bool = False,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose target label is not -100, and their count.

    As in transformers, ``logits[t]`` predicts ``labels[t + 1]``, so ``labels`` is ``input_ids`` with -100
    wherever nothing is scored (padding on the right, masked prompts). ``position_ids`` restarting at 0 mark
    packed documents (they attend only within themselves); None means one sequence per row. Works for plain
    and peft models, 4-bit or 16-bit, in training and under ``torch.no_grad()`` in eval mode; the sum is a
    float32 scalar tensor (connected to the trainable parameters when grad is enabled, even when the count is
    0, so that a backward pass reaches every trainable parameter).

    Only hidden states of trained positions reach the output head (padding and masked prompts cost nothing
    there). When their fp32 logits fit in ``LOSS_LOGITS_BUDGET`` they are computed in one go; otherwise in
    chunks of :func:`loss_chunk_tokens` positions, so peak memory holds one chunk of logits instead of
    [batch, seq, vocab]. A frozen head (the LoRA case) gets the gradient w.r.t. the hidden states in the
    forward pass, chunk by chunk, and keeps no logits at all; a trainable or wrapped head keeps autograd's
    own path, with each chunk recomputed in the backward pass (a second pass through the head, which is why
    small batches skip chunking). Heads that post-process logits (soft-capping, scaling) go through the
    model's own forward. ``compiled_head`` (training with ``train.compile``) runs each chunk of the frozen
    head's loss through one torch.compile'd function (:func:`_head_chunk`; the first call compiles it).

    Example::

        with torch.no_grad():
            loss_sum, n = causal_lm_loss_sum(model, ids, labels)
        mean_nll = loss_sum.item() / max(n, 1)
    """
    base = base_model(model)
    targets = labels[:, 1:]  # logits[t] predicts token t+1
    keep = targets != -100
    n = int(keep.sum())
    if n == 0:
        zero = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        if torch.is_grad_enabled():
            zero = sum((p.sum() * 0 for p in model.parameters() if p.requires_grad), zero)
        return zero, 0
    # use_cache=False: transformers only derives the packed-document mask from position_ids without a KV cache
    if not _supports_hidden_state_loss(base):
        extra = packed_attention_kwargs(model)
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits
        keep, targets = keep.to(logits.device), targets.to(logits.device)
        return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum"), n
    decoder = base.get_decoder()
    extra = packed_attention_kwargs(decoder)
    hidden = decoder(
        input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra
    ).last_hidden_state
    keep, targets = keep.to(hidden.device), targets.to(hidden.device)
    h = hidden[:, :-1][keep]  # [n, hidden]
    y = targets[keep]  # [n]
    head = base.get_output_embeddings()

    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h_chunk).float(), y_chunk, reduction="sum")

    vocab = int(getattr(base.config, "vocab_size", 0) or head.weight.shape[0])
    chunk = loss_chunk_size(n, vocab)
    if _frozen_linear_head(head):
        if h.device.type == "cpu":
            chunk = min(chunk, cpu_head_chunk(vocab))
        return _FrozenHeadCrossEntropy.apply(h, head.weight, head.bias, y, chunk, compiled_head), n
    if chunk >= n:
        return chunk_loss(h, y), n
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        hc, yc = h[i : i + chunk], y[i : i + chunk]
        total = total + (
            recompute(chunk_loss, hc, yc, use_reentrant=False) if h.requires_grad else chunk_loss(hc, yc)
        )
    return total, n
