"""``adapter.gradient_checkpointing: auto``: recompute activations only where memory needs it.

Checkpointing trades one extra forward pass per step (about a quarter more compute for QLoRA) for most of
the activation memory. Where memory is plentiful (a CPU with tens of GB, a large GPU for a small model) it
only costs time; where it is tight it is what makes a step fit. :func:`choose_gradient_checkpointing` asks
the memory model (:func:`~lora_dapt.planning.memory.estimate_memory`) what a step needs without it, and
compares that with the memory free on the device now (the base is loaded by then, so its weights are
already counted as used and left out of the step's need).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import AdapterConfig
from .available import free_memory_bytes

HEADROOM = 0.7
"""Checkpointing stays off while a step's memory without it is under this fraction of the free memory."""

GiB = 1024**3


@dataclass(frozen=True)
class CheckpointingChoice:
    """Whether to checkpoint, and why (the sentence lora_dapt logs)."""

    enabled: bool
    reason: str


def choose_gradient_checkpointing(
    model: Any,
    adapter: AdapterConfig,
    *,
    seq_len: int,
    batch_size: int = 1,
    free_bytes: int | None = None,
) -> CheckpointingChoice:
    """Resolve ``adapter.gradient_checkpointing``: an explicit True/False is kept; 'auto' turns it off when a
    step without it needs under :data:`HEADROOM` of the free memory (``free_bytes``, measured when None).

    Args:
        model: the loaded base model (its shapes, quantization and device are read from it).
        adapter: the adapter settings (rank, dropout, embeddings).
        seq_len, batch_size: tokens per block and blocks per micro-step of the run.
        free_bytes: free memory to compare with (tests); None: measured on the model's device.
    """
    setting = adapter.gradient_checkpointing
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"gradient_checkpointing must be True, False or 'auto', not {setting!r}")
    if setting is True or setting is False:
        how = "on" if setting else "off"
        return CheckpointingChoice(setting, f"gradient checkpointing {how} (adapter.gradient_checkpointing)")
    from ..model.bnb import describe_quantization
    from .memory import estimate_memory

    param = next(model.parameters())
    device = param.device
    quant, _compute = describe_quantization(getattr(model, "config", None))
    quant = None if quant == "none" else quant
    dtype = str(getattr(model, "dtype", param.dtype)).removeprefix("torch.")
    dtype = dtype if dtype in ("bfloat16", "float16", "float32") else "float32"
    kwargs = dict(seq_len=seq_len, batch_size=batch_size, compute_dtype=dtype, device=device.type)
    without = estimate_memory(model, quant, adapter, gradient_checkpointing=False, **kwargs)
    need = without.total - without.weights  # the base is loaded already: its weights are in 'used'
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    where = "GPU" if device.type == "cuda" else "RAM"
    if need < HEADROOM * free:
        return CheckpointingChoice(
            False,
            f"gradient checkpointing off (adapter.gradient_checkpointing=auto): a step needs about "
            f"{need / GiB:.2f} GiB without it, {free / GiB:.1f} GiB {where} free; no recompute, ~25% less "
            "compute per step",
        )
    return CheckpointingChoice(
        True,
        f"gradient checkpointing on (adapter.gradient_checkpointing=auto): a step would need about "
        f"{need / GiB:.2f} GiB without it, more than {HEADROOM:.0%} of the {free / GiB:.1f} GiB {where} free",
    )
