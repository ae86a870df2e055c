"""Bytes of each part of a training step's peak memory, as pure functions of a :class:`ModelShape`.

:func:`lora_dapt.planning.memory.estimate_memory` checks the arguments and adds these up; its module docstring
says what each part holds. ``s`` is always the byte size of the compute dtype (2 for bf16/fp16, 4 for fp32).
The weight terms are exact to within bitsandbytes' per-tensor constants; the activation and loss terms are a
model of what autograd saves, fitted to measured steps (the coefficients say where they come from).
"""

from __future__ import annotations

import math

from ..config import AdapterConfig
from ..errors import ConfigError
from .shapes import ModelShape

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per value of each compute dtype."""


def linear_weight_bytes(shape: ModelShape, quantization: str | None, s: int, double_quant: bool) -> int:
    """Bytes of the (frozen) linear layers LoRA can target, as bitsandbytes stores them (a 4096 x 4096
    layer: 8,655,940 in NF4 with double quantization, 16,793,600 in int8, 33,554,432 in bf16)."""
    total = 0
    for _, i, o in shape.linears:
        n = i * o
        if quantization in ("nf4", "fp4"):
            # packed 4-bit values + absmax per 64-block; double quant stores absmax as uint8 with an fp32
            # absmax per 256 blocks, plus two small codebooks (16 and 256 fp32) per tensor
            blocks = math.ceil(n / 64)
            if double_quant:
                total += n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256) + 4
            else:
                total += n // 2 + 4 * blocks + 4 * 16
        elif quantization == "int8":
            total += n + 4 * o  # int8 weights + an fp32 scale per output row
        else:
            total += n * s
    return total


def lora_trainable_params(shape: ModelShape, adapter: AdapterConfig) -> int:
    """Parameters the adapter trains: A and B of every targeted layer (+ DoRA's magnitudes, + embeddings)."""
    targets = adapter.target_modules
    chosen = [(i, o) for leaf, i, o in shape.linears if targets == "all-linear" or leaf in set(targets)]
    if not chosen:
        raise ConfigError(
            f"adapter.target_modules = {targets!r} matches no linear layer of {shape.name}; its layers "
            f"are {', '.join(sorted({leaf for leaf, _, _ in shape.linears}))}"
        )
    trainable = sum(adapter.r * (i + o) for i, o in chosen)
    if adapter.use_dora:
        trainable += sum(o for _, o in chosen)  # DoRA's magnitude vector
    if adapter.train_embeddings:
        trainable += shape.embedding_params
    return trainable


def optimizer_bytes(trainable: int, optimizer: str, param_bytes: int) -> int:
    """Optimizer states: AdamW's two moments in the parameters' dtype, 8-bit AdamW's two bytes, SGD none."""
    if optimizer == "adamw":
        return trainable * 2 * param_bytes
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        # two uint8 moments + one fp32 absmax per 256-value block each (bitsandbytes blockwise 8-bit)
        return trainable * 2 + 2 * 4 * math.ceil(trainable / 256)
    return 0


def activation_bytes(
    shape: ModelShape, tokens: int, s: int, checkpointing: bool, lora_r: int, dropout: float, full_ft: bool
) -> int:
    """Bytes autograd saves for one micro-batch of ``tokens`` tokens (``lora_r`` 0 without an adapter)."""
    h, inter = shape.hidden_size, shape.intermediate_size
    n_lin = max(1, len(shape.linears) // max(1, shape.num_layers))  # LoRA-wrapped linears per layer
    # One decoder layer, bytes per token. The coefficients were fitted to the tensors autograd really saves
    # (torch.autograd.graph.saved_tensors_hooks, Llama + peft LoRA r=16 all-linear, dropout 0.05, fp32 and
    # bf16, hidden 256, MLP 512/1024): hidden-sized terms (two RMSNorms with their fp32 copies, q/k/v/o and
    # the attention kernel's inputs/outputs, LoRA dropout copies) ~ (6s + 34) bytes per hidden unit; MLP
    # terms (gate, up, silu, their product, down's dropout copy) ~ (6s + 9) per intermediate unit. Dropout
    # 0 drops the copies (about 1/4 of each). The CPU math attention's [heads, T, T] matrix is not counted
    # (flash / memory-efficient kernels on GPU do not keep it).
    per_layer = (6 * s + 34) * h + (6 * s + 9) * inter + n_lin * lora_r * s
    if dropout <= 0:
        per_layer = int(per_layer * 0.75)
    if checkpointing:
        # each layer keeps only its input hidden state (measured: exactly h*s per layer and token); the
        # backward pass recomputes one layer at a time and holds its activations plus their gradients
        kept = shape.num_layers * h * s + int(1.5 * per_layer)
    else:
        kept = shape.num_layers * per_layer
    # embedding output, final norm, the [n, hidden] copy of trained positions handed to the loss
    total = int(tokens * (kept + 2 * h * 4 + 3 * h * s))
    if full_ft and not checkpointing:
        total = int(total * 0.85)  # no LoRA inputs or dropout copies
    return total


def loss_bytes(
    shape: ModelShape, tokens: int, s: int, *, loss: str, chunk_tokens: int | None, trained_head: bool
) -> int:
    """Bytes the loss holds at its peak: 'chunked' (lora_dapt's loss) or 'full' ([batch, seq, vocab] logits).

    ``chunk_tokens`` None means what ``train`` does (``model.loss.loss_chunk_size``).
    """
    v = shape.vocab_size
    if loss == "full":
        # [B, T, V] logits kept for the outputs, fp32 upcast, log-softmax, and the fp32 gradient
        return tokens * v * (s + (4 if s != 4 else 0) + 4 + 4)
    if chunk_tokens is None:
        from ..model.loss import loss_chunk_size

        chunk_tokens = loss_chunk_size(tokens, v)
    n = min(tokens, chunk_tokens)
    if trained_head:
        # autograd, one chunk in the backward pass: logits (compute dtype), their fp32 copy (a no-op in fp32),
        # the saved log-softmax and the fp32 gradient
        return n * v * (s + (4 if s != 4 else 0) + 4 + 4)
    # a frozen head: the gradient is made in the forward pass, a chunk at a time: fp32 logits and their
    # log-softmax at once, then the softmax cast to the compute dtype; plus the stored [tokens, hidden]
    # gradient of the hidden states
    return n * v * (4 + max(4, s if s != 4 else 0)) + tokens * shape.hidden_size * s


def transient_weight_bytes(shape: ModelShape, quantization: str | None, s: int, upcast: bool) -> int:
    """Weights materialised for one matmul: the fp32 head cast to the compute dtype (autocast does not cache
    a frozen weight), and one dequantized bitsandbytes layer (twice: forward and backward)."""
    total = 0
    if upcast and s != 4:
        total += shape.vocab_size * shape.hidden_size * s
    if quantization in ("nf4", "fp4", "int8"):
        total += 2 * max(i * o for _, i, o in shape.linears) * s
    return total
