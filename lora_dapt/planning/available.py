"""Memory free on a device now: what the automatic choices compare their estimates with (gradient
checkpointing, scoring the original 16-bit model, ``lora-dapt init``)."""

from __future__ import annotations

from typing import Any


def free_memory_bytes(device: Any = "cpu") -> int:
    """Free memory on ``device`` now: ``torch.cuda.mem_get_info`` on CUDA; on the CPU the RAM available to a
    new allocation without swapping (psutil's ``available``: Linux's ``MemAvailable``)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)
