"""Every bitsandbytes touch: the quantization config, the CPU repacking guard, dequantization and the sizes
of quantized tensors.

bitsandbytes is optional at import time (``lora-dapt --help``, planning and 16-bit runs never need it), so
it is imported lazily, here only, and its layers and parameters are recognised by class name
(:func:`is_quantized_linear`, :func:`is_4bit_param`) instead of ``isinstance``. The price is that a
subclass with another name is not recognised.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, MergeError, ModelLoadError, TrainingError

QUANTIZED_LINEAR_TYPES = ("Linear4bit", "Linear8bitLt")
"""Class names of bitsandbytes' quantized linear layers (compared by name: bitsandbytes is imported lazily)."""


def is_quantized_linear(module: Any) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    return type(module).__name__ in QUANTIZED_LINEAR_TYPES


def is_4bit_param(param: Any) -> bool:
    """A bitsandbytes packed 4-bit weight (two values per stored byte)."""
    return type(param).__name__ == "Params4bit"


def logical_numel(param: Any) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per stored byte (two per uint8
    element, four per bfloat16 element with ``model.quant_storage='bfloat16'``)."""
    return param.numel() * (2 * param.element_size() if is_4bit_param(param) else 1)


def stored_bytes(param: Any) -> int:
    """Bytes a loaded parameter holds, bitsandbytes' quantization constants included (4-bit absmax and
    codebooks, nested ones with double quantization; int8 row scales)."""
    n = param.numel() * param.element_size()
    qs = getattr(param, "quant_state", None)
    if qs is not None:
        for t in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None), getattr(qs.state2, "code", None)):
            if t is not None:
                n += t.numel() * t.element_size()
    scb = getattr(param, "SCB", None)
    if scb is not None:
        n += scb.numel() * scb.element_size()
    return n


def quantization_config(
    quantization: str | None,
    compute_dtype: torch.dtype,
    *,
    double_quant: bool = True,
    quant_storage: str = "uint8",
) -> Any | None:
    """A transformers ``BitsAndBytesConfig`` for 'nf4' | 'fp4' | 'int8', or None for 16-bit.

    4-bit weights are packed into ``quant_storage`` elements (uint8: two values a byte; bfloat16: four values
    an element), ``bnb_4bit_quant_storage``: uint8 by default, the compute dtype for FSDP, which shards one
    dtype per flat parameter (``model.quant_storage``). A missing bitsandbytes is a :class:`ModelLoadError`
    that names the fix.
    """
    if quantization in (None, "none"):
        return None
    if quantization not in ("nf4", "fp4", "int8"):
        raise ConfigError(f"quantization = {quantization!r}: use 'nf4', 'fp4', 'int8' or None")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes (or use quantization=None)"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=getattr(torch, quant_storage),
    )


def keep_4bit_trainable(model: Any) -> int:
    """Keep bitsandbytes 4-bit layers on the CPU in a layout that gradients flow through.

    bitsandbytes (0.49+) on CPUs with AVX512-BF16 repacks a Linear4bit's weight into an inference-only layout
    on its first eval-mode, no-grad forward (an evaluation, a generate()). The kernel it uses from then on
    has no backward, so after any evaluation the gradient stops at every frozen 4-bit layer and LoRA trains
    on silently wrong gradients (measured on the tiny test model: the first layer's LoRA gradient was off by
    more than its own size). We switch that repacking off per layer (an instance setting of Linear4bit);
    inference on the CPU is then a little slower. :func:`load_base_model` does this before the first forward.
    A layer repacked already cannot be restored exactly (bitsandbytes' inverse rounds the scales and the
    gradients stay visibly off), so a model in that state is refused with the fix.

    Returns the number of layers switched.
    """
    switched = repacked = 0
    for module in model.modules():
        if not (is_quantized_linear(module) and is_4bit_param(module.weight)):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
        state = getattr(module.weight, "quant_state", None)
        repacked += bool(state is not None and getattr(state, "packing_format_for_cpu", False))
    if repacked:
        raise TrainingError(
            f"{repacked} 4-bit layers of this model were repacked by bitsandbytes for CPU inference (it was "
            "evaluated or generated from before training), and that layout passes no gradient. Load the model "
            "again with lora_dapt.load_base_model, which prevents the repacking, then evaluate and train it."
        )
    return switched


def quantized_linears(model: Any) -> dict[str, torch.nn.Module]:
    """bitsandbytes 4-bit/8-bit linear layers by module name."""
    return {n: m for n, m in model.named_modules() if is_quantized_linear(m)}


@torch.no_grad()
def load_dequantized(peft_model: Any, quantized: dict[str, torch.nn.Module]) -> int:
    """Overwrite the 16-bit weights under ``peft_model`` with the dequantized 4-bit/8-bit ones, in place.

    The peft wrappers keep the base layer at ``<name>.base_layer``, so we copy into that layer's weight; the
    values are what the 4-bit forward pass multiplied with during training.
    """
    from peft.utils.integrations import dequantize_bnb_weight

    inner = peft_model.get_base_model()
    modules = dict(inner.named_modules())
    done = 0
    for name, qmod in quantized.items():
        if getattr(qmod.weight.quant_state, "packing_format_for_cpu", False):
            raise MergeError(f"cannot dequantize {name}: bitsandbytes repacked it for its CPU kernel")
        target = modules.get(f"{name}.base_layer", modules.get(name))
        if target is None or not hasattr(target, "weight"):
            raise MergeError(f"cannot dequantize {name}: the 16-bit model has no matching layer")
        w = dequantize_bnb_weight(qmod.weight, state=getattr(qmod, "state", None))
        target.weight.data.copy_(w.to(target.weight.dtype).reshape(target.weight.shape))
        done += 1
    return done


def describe_quantization(model_config: Any) -> tuple[str, str | None]:
    """(quantization, compute dtype) of a model config's bitsandbytes ``quantization_config``: ('nf4' | 'fp4'
    | 'int8' | 'none', e.g. 'bfloat16' or None). For a model that lora_dapt did not load."""
    qcfg = getattr(model_config, "quantization_config", None)
    if qcfg is None:
        return "none", None
    data = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    if data.get("load_in_4bit"):
        quant = str(data.get("bnb_4bit_quant_type") or "nf4")
    elif data.get("load_in_8bit"):
        quant = "int8"
    else:  # another quantizer (GPTQ, AWQ, ...): not bitsandbytes
        quant = "none"
    compute = data.get("bnb_4bit_compute_dtype")
    return quant, None if compute is None else str(compute).removeprefix("torch.")
