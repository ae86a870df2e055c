"""How much memory a run needs, and which settings make it fit a GPU.

:func:`estimate_memory` adds up what a LoRA/QLoRA (or full fine-tuning) step holds at its peak, in bytes:

* ``weights``: the frozen base. NF4/FP4 linear layers take 0.5 byte per parameter plus their quantization
  constants (one uint8 per 64 weights with double quantization, one fp32 per 64 without); int8 takes 1 byte
  plus an fp32 scale per row. Everything bitsandbytes does not quantize (embeddings, output head, norms) is
  held in the compute dtype: ``apply_lora`` deliberately skips the fp32 upcast of peft's
  ``prepare_model_for_kbit_training``, which for large vocabularies is the biggest item after the 4-bit
  weights (Llama-3-8B: 4.2 GB of fp32 embeddings and head against 3.6 GB of NF4 linears);
  ``upcast_non_quantized=True`` shows what a stack that upcasts needs.
* ``adapter``, ``gradients``, ``optimizer``: LoRA A/B matrices (fp32, peft's default), their fp32 gradients,
  and AdamW's two fp32 moments (8 bytes/parameter) or an 8-bit optimizer's two bytes.
* ``activations``: what autograd saves for the backward pass. Without gradient checkpointing every decoder
  layer keeps its norms, LoRA inputs (and dropout copies), attention inputs/outputs and MLP intermediates;
  with checkpointing only each layer's input survives, plus one layer recomputed at a time. Attention is
  counted for memory-efficient kernels (flash / SDPA without a materialised ``T x T`` matrix).
* ``logits``: the loss. lora_dapt's chunked loss holds ``[chunk, vocab]`` fp32 logits at a time
  (``train.loss_chunk_tokens``; with a frozen head, as in LoRA, the gradient is made in the forward pass and
  no logits are kept for the backward); a plain ``model(..., labels=...)`` loss holds ``[batch, seq, vocab]``.
* ``overhead``: on CUDA the context and cuBLAS workspaces (not seen by ``torch.cuda.max_memory_allocated``
  but taken from the card) plus allocator fragmentation.

The weights and adapter terms are exact to within bitsandbytes' per-tensor constants and are checked against
the bytes a loaded model really holds (``tests/test_memory.py``). Activations are a model of what PyTorch
saves, checked against the saved tensors of real steps on CPU (``benchmarks/bench_memory.py``); on GPU the
numbers have to be validated with ``benchmarks/bench_gpu.py``.

:func:`plan` searches sequence length, micro-batch, gradient checkpointing, optimizer and LoRA rank for
settings that fit a GPU, and says what does not fit and why. ``lora-dapt plan`` prints it::

    lora-dapt plan llama-3-8b --gpu-memory 12GB
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import AdapterConfig
from ..errors import ConfigError
from .components import (
    DTYPE_BYTES,
    activation_bytes,
    linear_weight_bytes,
    lora_trainable_params,
    loss_bytes,
    optimizer_bytes,
    transient_weight_bytes,
)
from .shapes import model_shape

if TYPE_CHECKING:
    import torch


def peak_memory_bytes(device: str | torch.device | None = None) -> int:
    """Peak memory so far: CUDA max allocated on a CUDA device, else this process's peak resident set size.

    ``device=None`` means CUDA when available. On the CPU the peak RSS covers the whole process (Python,
    the model, the data), which is what limits a CPU run.

    Example::

        print(f"peak {peak_memory_bytes() / 2**30:.2f} GiB")
    """
    import torch  # here, not at the top: the CLI imports this module to build its parser

    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        return int(torch.cuda.max_memory_allocated(dev))
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


GiB = 2**30


CUDA_CONTEXT_BYTES = 512 * 2**20
"""CUDA context + cuBLAS/cuDNN workspaces: memory the card loses that torch's allocator never reports."""


FRAGMENTATION = 0.05
"""Allocator slack on top of what is allocated (the caching allocator rounds and fragments blocks)."""


@dataclass
class MemoryEstimate:
    """Peak memory of one training step, by component, in bytes (see the module docstring for each)."""

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    trainable_params: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.adapter
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.overhead
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready) including ``total``."""
        return {**asdict(self), "total": self.total}

    def table(self) -> str:
        """A small human-readable breakdown in GiB.

        Example::

            print(estimate_memory("llama-3-8b", seq_len=2048).table())
        """
        rows = [
            ("base weights", self.weights),
            (f"adapter ({self.trainable_params / 1e6:.1f}M trainable)", self.adapter),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("loss / logits", self.logits),
            ("overhead", self.overhead),
        ]
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"{label:<{width}}{b / GiB:8.2f} GiB" for label, b in rows]
        lines.append(f"{'total':<{width}}{self.total / GiB:8.2f} GiB")
        return "\n".join(lines)


def estimate_memory(
    model_or_config: Any,
    quantization: str | None = "nf4",
    adapter: AdapterConfig | int | None = 16,
    seq_len: int = 2048,
    batch_size: int = 1,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    *,
    compute_dtype: str = "bfloat16",
    device: str = "cuda",
    double_quant: bool = True,
    upcast_non_quantized: bool | None = None,
    loss: str = "chunked",
    loss_chunk_tokens: int | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one training step.

    Args:
        model_or_config: a known name ('llama-3-8b', see ``shapes.known_models()``), a model directory (config.json, or
            a GGUF file whose metadata holds the config), a transformers config or config dict, or a model.
        quantization: 'nf4' | 'fp4' | 'int8' | None (16-bit base).
        adapter: an :class:`AdapterConfig`, a LoRA rank, or None for full fine-tuning (every weight trained).
        seq_len, batch_size: tokens per block and blocks per micro-step.
        gradient_checkpointing: recompute activations in the backward pass.
        optimizer: 'adamw' (two fp32 moments), 'adamw_8bit' / 'paged_adamw_8bit' (two bytes), 'sgd' (none).
        compute_dtype: dtype of non-quantized weights and activations ('bfloat16' on GPUs, 'float32' on CPU).
        device: 'cuda' adds the CUDA context and allocator slack; 'cpu' adds nothing (compare with RSS growth).
        double_quant: bitsandbytes double quantization of the 4-bit constants (lora_dapt's default).
        upcast_non_quantized: non-quantized parameters in fp32 (as peft's ``prepare_model_for_kbit_training``
            leaves them); None = what ``apply_lora`` does (keeps them in the compute dtype).
        loss: 'chunked' (lora_dapt's loss) or 'full' (``model(..., labels=...)``: [batch, seq, vocab] logits).
        loss_chunk_tokens: positions per chunk of the chunked loss (default: what ``train`` does, all
            positions while their fp32 logits fit ``LOSS_LOGITS_BUDGET``, else ``loss_chunk_tokens(vocab)``).

    Returns:
        A :class:`MemoryEstimate`; ``.total`` in bytes, ``.table()`` to print.

    Example::

        est = estimate_memory("llama-3-8b", "nf4", AdapterConfig(r=16), seq_len=2048, batch_size=2)
        print(est.table())
    """
    if quantization in ("none", ""):
        quantization = None
    problems = _argument_problems(quantization, adapter, seq_len, batch_size, optimizer, compute_dtype, loss)
    if problems:
        raise ConfigError(problems, header="cannot estimate memory")
    if isinstance(adapter, int):
        adapter = AdapterConfig(r=adapter)
    shape = model_shape(model_or_config)
    s = DTYPE_BYTES[compute_dtype]
    upcast = bool(upcast_non_quantized)
    full_ft = adapter is None

    weights = linear_weight_bytes(shape, quantization, s, double_quant)
    weights += (shape.embedding_params + shape.other_params) * (4 if upcast else s)
    if full_ft:
        trainable = shape.total_params
        p_bytes = s  # full fine-tuning trains the weights in their own dtype
        adapter_bytes = 0
        lora_r, dropout = 0, 0.0
    else:
        trainable = lora_trainable_params(shape, adapter)
        p_bytes = 4  # peft keeps adapter weights in fp32
        adapter_bytes = trainable * p_bytes
        lora_r, dropout = adapter.r, adapter.dropout
    gradients = trainable * p_bytes
    opt_bytes = optimizer_bytes(trainable, optimizer, p_bytes)

    tokens = seq_len * batch_size
    activations = activation_bytes(shape, tokens, s, gradient_checkpointing, lora_r, dropout, full_ft)
    trained_head = full_ft or adapter.train_embeddings
    logits = loss_bytes(
        shape, tokens, s, loss=loss, chunk_tokens=loss_chunk_tokens, trained_head=trained_head
    )
    logits += transient_weight_bytes(shape, quantization, s, upcast)

    base = weights + adapter_bytes + gradients + opt_bytes + activations + logits
    overhead = (CUDA_CONTEXT_BYTES + int(FRAGMENTATION * base)) if device.startswith("cuda") else 0
    return MemoryEstimate(
        weights=int(weights),
        adapter=int(adapter_bytes),
        gradients=int(gradients),
        optimizer=int(opt_bytes),
        activations=int(activations),
        logits=int(logits),
        overhead=int(overhead),
        trainable_params=int(trainable),
        settings={
            "model": shape.name,
            "params": shape.total_params,
            "quantization": quantization or "none",
            "method": "full" if full_ft else "lora",
            "rank": lora_r,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "gradient_checkpointing": gradient_checkpointing,
            "optimizer": optimizer,
            "compute_dtype": compute_dtype,
            "device": device,
            "upcast_non_quantized": upcast,
            "loss": loss,
        },
    )


def _argument_problems(
    quantization: str | None,
    adapter: AdapterConfig | int | None,
    seq_len: Any,
    batch_size: Any,
    optimizer: str,
    compute_dtype: str,
    loss: str,
) -> list[str]:
    """Every problem with estimate_memory's settings at once, each naming the argument and the fix."""
    problems = []
    if quantization not in (None, "nf4", "fp4", "int8"):
        problems.append(f"quantization = {quantization!r}: use 'nf4', 'fp4', 'int8' or None")
    if compute_dtype not in DTYPE_BYTES:
        problems.append(f"compute_dtype = {compute_dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    if optimizer not in ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"):
        problems.append(f"optimizer = {optimizer!r}: use 'adamw', 'adamw_8bit', 'paged_adamw_8bit' or 'sgd'")
    if not (isinstance(seq_len, int) and seq_len >= 2):
        problems.append(f"seq_len = {seq_len!r}: must be an int >= 2")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        problems.append(f"batch_size = {batch_size!r}: must be an int >= 1")
    if adapter is None and quantization is not None:
        problems.append(
            "adapter = None (full fine-tuning) needs quantization=None: quantized weights cannot be trained"
        )
    if loss not in ("chunked", "full"):
        problems.append(f"loss = {loss!r}: use 'chunked' or 'full'")
    return problems


def tensor_bytes(model: Any) -> dict[str, int]:
    """Bytes a loaded model really holds, counted tensor by tensor (4-bit packed storage and its quantization
    constants, int8 row scales included): ``{"weights": frozen, "adapter": trainable, "buffers": ...}``.

    Used to check :func:`estimate_memory` against reality.

    Example::

        model, _ = load_base_model(path, quantization="nf4")
        print(tensor_bytes(model)["weights"] / 2**20, "MiB")
    """
    from ..model.bnb import stored_bytes

    out = {"weights": 0, "adapter": 0, "buffers": 0}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out["adapter" if p.requires_grad else "weights"] += stored_bytes(p)
    for b in model.buffers():
        out["buffers"] += b.numel() * b.element_size()
    return out


_UNITS = {"": GiB, "b": 1, "k": 2**10, "m": 2**20, "g": GiB, "t": 2**40}


def parse_memory(text: str | int | float) -> int:
    """Parse a memory size into bytes. 'GB' counts as GiB: a '12 GB' card has 12 GiB (12288 MiB).

    A bare number is in GB. Accepts B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB, any case, with or without a
    space.

    >>> parse_memory("12GB"), parse_memory("24 GiB") == 24 * 2**30, parse_memory("8000MiB"), parse_memory(16)
    (12884901888, True, 8388608000, 17179869184)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", str(text))
        if m is None:
            raise ConfigError(
                f"memory size {text!r}: give a number with a unit, such as '12GB', '24 GiB' or '8000MiB'"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
        if not unit and m.group(3):
            unit = "b"
    if value <= 0 or not math.isfinite(value):
        raise ConfigError(f"memory size {text!r}: must be > 0")
    return int(value * _UNITS[unit])


@dataclass
class Plan:
    """Settings that fit (or the closest miss), their estimate, and why the search chose them."""

    model: str
    gpu_memory: int
    fits: bool
    seq_len: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    optimizer: str
    rank: int
    quantization: str
    estimate: MemoryEstimate
    notes: list[str] = field(default_factory=list)
    """Why each setting was chosen, what was given up, and what does not fit."""
    gpus: int = 1
    """GPUs (one process each); ``estimate`` is per GPU (``planning.sharding``)."""
    strategy: str = "ddp"
    """'ddp' (whole model on every GPU) or 'fsdp' (sharded base weights)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["estimate"] = self.estimate.to_dict()
        return d

    def config_overrides(self) -> list[str]:
        """The plan as ``lora-dapt train --set`` overrides."""
        return [
            f"data.seq_len={self.seq_len}",
            f"train.batch_size={self.micro_batch_size}",
            f"train.gradient_accumulation_steps={self.gradient_accumulation_steps}",
            f"adapter.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            f"train.optimizer={self.optimizer}",
            f"adapter.r={self.rank}",
            f"model.quantization={self.quantization}",
        ]


_SEQ_CANDIDATES = (8192, 4096, 2048, 1024, 512, 256, 128)


_OPTIMIZERS = ("adamw", "paged_adamw_8bit")


BUSY_TOKENS = 2048
"""Tokens per micro-step that keep a GPU busy; beyond them a larger micro-batch gains less than gradient
checkpointing costs (about a third more compute)."""


def plan(
    model: Any,
    gpu_memory: int | str,
    seq_len: int | None = None,
    *,
    quantization: str | None = "nf4",
    rank: int = 16,
    target_modules: str | list[str] = "all-linear",
    tokens_per_step: int = 32768,
    max_seq_len: int = 4096,
    compute_dtype: str = "bfloat16",
    min_rank: int = 4,
    gpus: int = 1,
    strategy: str = "ddp",
) -> Plan:
    """Pick seq_len, micro-batch, accumulation, checkpointing, optimizer and rank that fit ``gpu_memory``.

    Preference, most important first: keep the requested LoRA rank; the longest sequence (``seq_len`` when
    given, else the longest of 4096, 2048, ... the model supports, capped at ``max_seq_len``); a micro-step
    of at least ``BUSY_TOKENS`` tokens; no gradient checkpointing (it costs a third more compute); plain AdamW
    over paged 8-bit AdamW; then the larger micro-batch. Accumulation brings each optimizer step to about
    ``tokens_per_step`` tokens, so the effective batch does not depend on what fits. ``gpus`` > 1: the
    estimate is per GPU under ``strategy`` ('ddp' or 'fsdp', :mod:`lora_dapt.planning.sharding`) and a step
    is micro-batch x accumulation x ``gpus`` blocks.

    Example::

        p = plan("llama-3-8b", "12GB")
        print(format_plan(p))
    """
    budget = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
    if budget <= 0:
        raise ConfigError(f"gpu_memory = {gpu_memory!r}: must be > 0")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        raise ConfigError(f"seq_len = {seq_len!r}: must be an int >= 2, or None to let plan choose")
    if not (isinstance(rank, int) and rank >= 1):
        raise ConfigError(f"rank = {rank!r}: must be an int >= 1 (a LoRA rank such as 8, 16 or 64)")
    from .sharding import accumulation_for, check_parallelism, per_gpu_estimate, sharding_note

    check_parallelism(gpus, strategy)
    shape = model_shape(model)
    max_pos = shape.max_position_embeddings or max_seq_len
    if seq_len is not None:
        seqs = [seq_len]
    else:
        seqs = [s for s in _SEQ_CANDIDATES if s <= min(max_seq_len, max_pos)] or [min(max_seq_len, max_pos)]
    ranks = [rank] + [r for r in (rank // 2, rank // 4, rank // 8) if min_rank <= r < rank]

    def est(
        r: int, t: int, b: int, ckpt: bool, opt: str, quant: str | None = quantization, n: int = gpus
    ) -> MemoryEstimate:
        lora = AdapterConfig(r=r, target_modules=target_modules)
        one = estimate_memory(shape, quant, lora, t, b, ckpt, opt, compute_dtype=compute_dtype, device="cuda")
        return per_gpu_estimate(one, shape, n, strategy)

    # every setting tried, ranked by the preferences of the docstring (the tuple compares in that order)
    best: tuple[tuple, tuple[int, int, int, bool, str], MemoryEstimate] | None = None
    for r in ranks:
        for t in seqs:
            for b in (16, 8, 4, 2, 1):
                if b > 1 and b * t > 4 * max(BUSY_TOKENS, t):
                    continue
                for ckpt in (False, True):
                    for opt in _OPTIMIZERS:
                        e = est(r, t, b, ckpt, opt)
                        key = (r == rank, r, t, min(b * t, BUSY_TOKENS), not ckpt, opt == "adamw", b)
                        if e.total <= budget and (best is None or key > best[0]):
                            best = (key, (r, t, b, ckpt, opt), e)
    q = quantization or "none"
    if best is None:
        # nothing fits: report the smallest configuration and what takes the memory
        r, t = ranks[-1], seqs[-1]
        e = est(r, t, 1, True, "paged_adamw_8bit")
        notes = [
            f"does not fit: even seq_len {t}, micro-batch 1, gradient checkpointing, paged 8-bit AdamW and rank "
            f"{r} need {e.total / GiB:.1f} GiB, more than {budget / GiB:.1f} GiB",
            f"the frozen base alone takes {e.weights / GiB:.1f} GiB ({q}); activations {e.activations / GiB:.2f} "
            f"GiB, loss {e.logits / GiB:.2f} GiB, CUDA context and slack {e.overhead / GiB:.2f} GiB",
        ]
        if quantization in (None, "int8"):
            e4 = est(r, t, 1, True, "paged_adamw_8bit", "nf4")
            notes.append(f"with quantization='nf4' it would need {e4.total / GiB:.1f} GiB")
        notes.append("options: a GPU with more memory, a smaller model, or a CPU run (slow)")
        accum = accumulation_for(tokens_per_step, t, gpus)
        fail = (t, 1, accum, True, "paged_adamw_8bit", r, q, e, notes, gpus, strategy)
        return Plan(shape.name, budget, False, *fail)

    r, t, b, ckpt, opt = best[1]
    e = best[2]
    accum = accumulation_for(tokens_per_step, b * t, gpus)
    notes = [f"fits: {e.total / GiB:.1f} of {budget / GiB:.1f} GiB estimated"]
    if seq_len is None and t < seqs[0]:
        e_long = est(r, seqs[0], 1, True, "paged_adamw_8bit")
        notes.append(
            f"seq_len {seqs[0]} does not fit even at micro-batch 1 with checkpointing and paged 8-bit "
            f"AdamW ({e_long.total / GiB:.1f} GiB; activations {e_long.activations / GiB:.1f} GiB)"
        )
    if ckpt:
        e_no = est(r, t, b, False, opt)
        notes.append(
            f"gradient checkpointing on: without it activations take {e_no.activations / GiB:.1f} GiB "
            f"instead of {e.activations / GiB:.1f} GiB (costs about a third more compute)"
        )
    if opt != "adamw":
        e_adam = est(r, t, b, ckpt, "adamw")
        notes.append(
            f"paged 8-bit AdamW: plain AdamW would need {(e_adam.total - e.total) / GiB:.2f} GiB more "
            f"({e_adam.total / GiB:.1f} GiB)"
        )
    if r != rank:
        notes.append(f"LoRA rank lowered from {rank} to {r}: rank {rank} did not fit at any setting")
    if b * t < BUSY_TOKENS:
        notes.append(f"micro-step of {b * t} tokens: the GPU will be under-used; expect lower tokens/s")
    if gpus > 1:
        notes.append(sharding_note(e, est(r, t, b, ckpt, opt, n=1), gpus, strategy))
    each = f" ({gpus} GPUs x {b * t * accum:,})" if gpus > 1 else ""
    notes.append(
        f"gradient accumulation {accum}: {b * t * accum * gpus:,} tokens per optimizer step{each} "
        f"(target {tokens_per_step:,})"
    )
    return Plan(shape.name, budget, True, t, b, accum, ckpt, opt, r, q, e, notes, gpus, strategy)
