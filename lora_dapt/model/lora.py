"""Attaching a LoRA adapter (peft) to a base model, preparing the base for training, loading a saved adapter.

peft does the adapter; this module chooses what peft does not: the base stays in its 16-bit (or 4-bit)
dtype while every trainable tensor is fp32 (:func:`prepare_for_training` skips peft's upcast of the whole
base, several GB on an 8B model), tied embeddings stay tied when they are trained, adapters load only from
safetensors, and LoRA dropout draws its mask faster on the CPU (:class:`CPUDropout`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..config import AdapterConfig
from ..errors import ConfigError, ModelLoadError
from .bnb import is_quantized_linear, keep_4bit_trainable, logical_numel

log = logging.getLogger("lora_dapt")


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper; the model itself when it has none."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def linear_module_names(model: Any) -> list[str]:
    """Distinct leaf names of the linear layers (the names LoRA can target), output head excluded."""
    out_emb = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is out_emb:
            continue
        if isinstance(module, torch.nn.Linear) or is_quantized_linear(module):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _module_name(model: Any, target: torch.nn.Module) -> str | None:
    """The leaf name of ``target`` inside ``model`` (what peft's ``modules_to_save`` matches), or None."""
    for name, module in model.named_modules():
        if module is target:
            return name.rsplit(".", 1)[-1]
    return None


def tied_embeddings(model: Any) -> bool:
    """Whether the input embeddings and the output head share one weight tensor."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and inp.weight.data_ptr() == out.weight.data_ptr()


def prepare_for_training(model: Any, *, gradient_checkpointing: bool = True) -> Any:
    """Get a (quantized or 16-bit) base model ready for an adapter to train on it; returns the model.

    What peft's ``prepare_model_for_kbit_training`` does (freeze the base; with non-reentrant checkpointing
    the inputs need no grad hook) MINUS its upcast of every 16-bit parameter to fp32: for Llama-3-8B that
    upcast alone adds 4.2 GB (embeddings and head) to a 5.5 GB QLoRA model, and frozen bf16 weights are what
    every other stack trains against. Also keeps 4-bit layers trainable on the CPU (:func:`keep_4bit_trainable`)
    and turns the KV cache off: packed blocks keep documents apart through position_ids, which transformers
    honours only without a cache (generation turns it back on per call).
    """
    keep_4bit_trainable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        # non-reentrant checkpointing reaches the parameters inside without the embedding output requiring
        # grad (peft's enable_input_require_grads would add a backward pass through layer 0's inputs)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.config.use_cache = False
    return model


class CPUDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask is drawn faster on the CPU; the same distribution and scaling.

    PyTorch's CPU dropout draws its Bernoulli mask with the Mersenne Twister, one number per element: with
    LoRA dropout on all-linear targets that was about a fifth of a SmolLM2 training step on two cores. Here
    the mask comes from NumPy's PCG64 (32 random bits per element; an element is kept with probability
    ``1 - p`` to within 2**-32), seeded from PyTorch's generator, so ``torch.manual_seed`` still reproduces
    a run. Eval mode, ``p == 0`` and CUDA tensors go to ``nn.Dropout`` unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        import numpy as np

        seed = int(torch.randint(0, 2**62, (1,)).item())
        n = x.numel()
        raw = np.random.PCG64(seed).random_raw((n + 1) // 2)  # uint64: two uniform 32-bit halves each
        bits = torch.from_numpy(raw.view(np.int32)[:n]).view(x.shape)
        threshold = round(self.p * 2**32) - 2**31  # P(bits < threshold) = p
        return torch.where(bits >= threshold, x, 0.0) * (1.0 / (1.0 - self.p))


def use_cpu_dropout(model: Any) -> int:
    """Replace peft's LoRA dropout modules (``lora_dropout``) with :class:`CPUDropout`; returns how many."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                fast = CPUDropout(drop.p)
                fast.train(drop.training)
                drops[name] = fast
                n += 1
    return n


def _trainable_to_fp32(model: Any) -> None:
    """AdamW on 16-bit weights loses small updates: keep every trainable tensor (LoRA, and the embedding/head
    copies of train_embeddings) in fp32. Tied copies share one Parameter, so they stay tied."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def apply_lora(model: Any, config: AdapterConfig | None = None, **overrides: Any) -> Any:
    """Attach a LoRA adapter (peft) to ``model`` and return the ``PeftModel``.

    ``overrides`` replace single fields of ``config``. Freezes the base and turns on gradient checkpointing
    when asked (:func:`prepare_for_training`), checks that explicit ``target_modules`` exist (naming the
    linear layers that do), and with ``train_embeddings`` trains the input embeddings and the output head in
    full (``modules_to_save``), keeping tied weights tied. Trainable tensors are fp32. Logs trainable /
    total parameters.

    Example::

        model = apply_lora(model, AdapterConfig(r=64, alpha=128, use_rslora=True))
    """
    from peft import LoraConfig, get_peft_model

    cfg = config or AdapterConfig()
    if overrides:
        cfg = cfg.replace(**overrides)
    if hasattr(model, "peft_config"):
        raise ConfigError(
            "this model already has a LoRA adapter; load the base model again to start a new one"
        )

    available = linear_module_names(model)
    if isinstance(cfg.target_modules, list):
        missing = [t for t in cfg.target_modules if t not in available]
        if missing:
            raise ConfigError(
                f"adapter.target_modules: {', '.join(missing)} not found in {type(model).__name__}; "
                f"its linear layers are: {', '.join(available)} (or use 'all-linear')"
            )

    prepare_for_training(model, gradient_checkpointing=cfg.gradient_checkpointing)

    modules_to_save = None
    tie = False
    if cfg.train_embeddings:
        emb = _module_name(model, model.get_input_embeddings())
        head = _module_name(model, model.get_output_embeddings())
        modules_to_save = [n for n in (emb, head) if n]
        tie = tied_embeddings(model)

    lora_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save,
        ensure_weight_tying=tie,
        init_lora_weights=cfg.init_lora_weights,
    )
    peft_model = get_peft_model(model, lora_cfg)
    _trainable_to_fp32(peft_model)
    trainable, total = count_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%g on %s%s: %s trainable of %s parameters (%.3f%%)",
        cfg.r,
        cfg.alpha,
        cfg.target_modules if isinstance(cfg.target_modules, str) else ",".join(cfg.target_modules),
        " + embeddings/head" if cfg.train_embeddings else "",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return peft_model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted as their logical size."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_adapter(model: Any, adapter_dir: str | Path, *, is_trainable: bool = False) -> Any:
    """Load a saved adapter onto a freshly loaded base model.

    Only safetensors weights are read: an adapter shipped as a pickle (``adapter_model.bin``) is refused,
    because unpickling a stranger's file can run code. An adapter whose shapes do not fit the model is
    refused with both names in the message.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"no adapter found in {adapter_dir} (expected adapter_config.json there)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if any(adapter_dir.glob("*.bin")) or any(adapter_dir.glob("*.pt")):
            raise ModelLoadError(
                f"{adapter_dir} holds its weights as a pickle (.bin/.pt), which can run code when loaded; "
                "lora_dapt loads adapters only from adapter_model.safetensors. Convert it where you trust it: "
                "PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise ModelLoadError(f"no adapter weights in {adapter_dir} (expected adapter_model.safetensors)")
    try:
        trained_for = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    except ValueError as e:
        raise ModelLoadError(f"{adapter_dir}/adapter_config.json is not valid JSON: {e}") from None
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        detail = next(
            (ln.strip() for ln in first if "size mismatch" in ln), first[0] if first else type(e).__name__
        )
        raise ModelLoadError(
            f"the adapter in {adapter_dir} (trained for base {trained_for!r}) does not fit the model "
            f"{getattr(model.config, '_name_or_path', type(model).__name__)!r}: {detail}. Load the base model "
            "the adapter was trained on."
        ) from None
    if is_trainable:
        _trainable_to_fp32(peft_model)
    return peft_model
