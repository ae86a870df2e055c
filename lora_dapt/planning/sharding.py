"""Per-GPU memory of a step on several GPUs: DDP (every GPU holds the whole model) or FSDP (sharded).

:func:`per_gpu_estimate` turns one GPU's :class:`~lora_dapt.planning.memory.MemoryEstimate` into what each
of ``gpus`` GPUs holds; :func:`lora_dapt.planning.memory.plan` uses it for ``lora-dapt plan MODEL --gpus N``.
Activations and the loss do not change: each rank runs its own micro-batch of the same size. What changes:

* **DDP** (``--strategy ddp``, what ``lora-dapt train --nproc N`` runs): nothing is divided. DDP's reducer
  keeps its own bucket copy of the gradients (the Trainer leaves ``gradient_as_bucket_view`` off), so the
  gradients count twice; for LoRA they are small. The gain is the global batch: N micro-batches per
  accumulation step, so the planner needs N times less accumulation for the same tokens per step.
* **FSDP** (``--strategy fsdp``, ``FULL_SHARD`` with one unit per decoder layer, as in
  ``examples/fsdp_qlora_accelerate.yaml``): the decoder layers' base weights, the adapter, its gradients and
  the optimizer states are divided by N. On top of that share, a rank gathers whole units while it uses
  them: the layer it computes and the one prefetched (``BACKWARD_PRE``), two layers' weights and adapter, and
  one layer's full gradient before it is reduce-scattered. The root unit (embeddings, output head) stays
  gathered for the whole step (FSDP does not reshard the root after the forward), so it counts in full
  beside its own 1/N shard.

Worked example (numbers of ``tests/test_sharding.py``): a base whose decoder layers take S = 8,000 bytes in
L = 4 layers, with a root of R = 1,000 bytes, on N = 2 GPUs under FSDP holds S/N + 2 S/L + R + R/N =
4,000 + 4,000 + 1,000 + 500 = 9,500 bytes of base weights per GPU.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

from ..errors import ConfigError
from .components import DTYPE_BYTES
from .memory import CUDA_CONTEXT_BYTES, FRAGMENTATION, GiB, MemoryEstimate
from .shapes import ModelShape

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")

GATHERED_LAYERS = 2
"""Decoder layers FSDP holds unsharded at once: the one computing and the one prefetched."""


def check_parallelism(gpus: object, strategy: object) -> None:
    """Raise :class:`ConfigError` for a GPU count below 1 or an unknown strategy."""
    problems = []
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        problems.append(f"gpus = {gpus!r}: must be an int >= 1 (the GPUs of the machine the run uses)")
    if strategy not in STRATEGIES:
        problems.append(f"strategy = {strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if problems:
        raise ConfigError(problems, header="cannot plan for several GPUs")


def root_weight_bytes(estimate: MemoryEstimate, shape: ModelShape) -> int:
    """Bytes of the root unit's base weights: the input embeddings and (untied) output head, held in the
    compute dtype (fp32 when the estimate upcasts what bitsandbytes does not quantize)."""
    settings = estimate.settings
    per_value = 4 if settings.get("upcast_non_quantized") else DTYPE_BYTES[settings["compute_dtype"]]
    return shape.embedding_params * per_value


def per_gpu_estimate(estimate: MemoryEstimate, shape: ModelShape, gpus: int, strategy: str) -> MemoryEstimate:
    """What each of ``gpus`` GPUs holds at the peak of a step whose one-GPU estimate is ``estimate``.

    Args:
        estimate: :func:`~lora_dapt.planning.memory.estimate_memory` of the same model and settings.
        shape: the model's shape (for the split into decoder layers and the root unit).
        gpus: processes, one per GPU (1: ``estimate`` unchanged).
        strategy: 'ddp' or 'fsdp' (see the module docstring for what each divides).

    Returns:
        A new :class:`MemoryEstimate` (``settings`` gain ``gpus`` and ``strategy``; the overhead's
        fragmentation share is recomputed from the per-GPU total).

    Example::

        e = estimate_memory("llama-3-8b", seq_len=2048)
        print(per_gpu_estimate(e, model_shape("llama-3-8b"), 2, "fsdp").table())
    """
    check_parallelism(gpus, strategy)
    if gpus == 1:
        return estimate
    if strategy == "ddp":
        weights, adapter, optimizer = estimate.weights, estimate.adapter, estimate.optimizer
        gradients = 2 * estimate.gradients  # the parameters' gradients + the reducer's buckets
    else:
        root = root_weight_bytes(estimate, shape)
        layers = estimate.weights - root
        n_layers = max(1, shape.num_layers)
        weights = (
            _share(layers, gpus) + GATHERED_LAYERS * _share(layers, n_layers) + root + _share(root, gpus)
        )
        adapter = _share(estimate.adapter, gpus) + GATHERED_LAYERS * _share(estimate.adapter, n_layers)
        gradients = _share(estimate.gradients, gpus) + _share(estimate.gradients, n_layers)
        optimizer = _share(estimate.optimizer, gpus)
    base = weights + adapter + gradients + optimizer + estimate.activations + estimate.logits
    overhead = estimate.overhead
    if str(estimate.settings.get("device", "cuda")).startswith("cuda"):
        overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * base)
    return replace(
        estimate,
        weights=weights,
        adapter=adapter,
        gradients=gradients,
        optimizer=optimizer,
        overhead=overhead,
        settings={**estimate.settings, "gpus": gpus, "strategy": strategy},
    )


def accumulation_for(tokens_per_step: int, micro_tokens: int, gpus: int) -> int:
    """Gradient accumulation that brings a global step (micro-batch x accumulation x ``gpus``) to about
    ``tokens_per_step`` tokens.

    >>> accumulation_for(32768, 2048, 1), accumulation_for(32768, 2048, 4)
    (16, 4)
    """
    return max(1, math.ceil(tokens_per_step / (micro_tokens * gpus)))


def sharding_note(estimate: MemoryEstimate, one_gpu: MemoryEstimate, gpus: int, strategy: str) -> str:
    """One line for the plan: what the other GPUs bring (``one_gpu``: the same settings on one GPU)."""
    if strategy == "ddp":
        return (
            f"DDP over {gpus} GPUs: each holds the whole model ({estimate.total / GiB:.1f} GiB); the global "
            f"batch is {gpus} micro-batches per accumulation step"
        )
    return (
        f"FSDP over {gpus} GPUs: base weights {one_gpu.weights / GiB:.2f} -> {estimate.weights / GiB:.2f} "
        f"GiB per GPU (decoder layers sharded, two gathered at a time; embeddings and head whole), adapter, "
        f"gradients and optimizer states 1/{gpus}; {one_gpu.total / GiB:.1f} -> {estimate.total / GiB:.1f} GiB"
    )


def _share(total: int, parts: int) -> int:
    """One of ``parts`` equal shares of ``total`` bytes, rounded up (FSDP pads the flat tensor to divide)."""
    return -(-total // parts)
