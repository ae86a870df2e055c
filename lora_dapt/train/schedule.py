"""train.schedule (split from train)."""

from __future__ import annotations

import math

from ..config import TrainConfig


def lr_factor(
    step: int,
    total_steps: int,
    *,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_ratio: float = 0.2,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly to the peak and reaches it at step ``warmup_steps`` (the first step already gets
    ``1/(warmup_steps+1)``, not zero). After warmup: cosine or linear decay to ``min_lr_ratio``; 'constant';
    or 'wsd' (warmup-stable-decay): flat, then a linear decay over the last ``decay_ratio`` of the steps.

    >>> [round(lr_factor(s, 10, scheduler="linear", warmup_steps=2, min_lr_ratio=0.0), 3) for s in (0, 2, 6, 10)]
    [0.333, 1.0, 0.5, 0.0]
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if scheduler == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if scheduler == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    if scheduler == "wsd":
        decay_steps = max(1, round(decay_ratio * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        frac = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - frac)
    raise ValueError(f"unknown scheduler {scheduler!r}")


def total_optimizer_steps(num_blocks: int, cfg: TrainConfig, seq_len: int, world_size: int = 1) -> int:
    """Optimizer steps from max_steps, else epochs, else max_tokens, else one epoch; one step takes the
    global batch, batch_size x gradient_accumulation_steps x ``world_size`` (the processes) blocks."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * num_blocks / per_step))
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / (per_step * seq_len)))
    return max(1, math.ceil(num_blocks / per_step))


def group_settings(cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """Learning rate and weight decay of each optimizer parameter group (by the group's name), the one rule
    :class:`~lora_dapt.train.trainer.DAPTTrainer` builds them with and a resume re-applies."""
    return {
        "lora": {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
        "embeddings": {"lr": cfg.embedding_learning_rate or cfg.learning_rate / 10, "weight_decay": 0.0},
    }
