"""Attaching a LoRA adapter (peft) to a base model, preparing the base for training, loading a saved adapter.

peft does the adapter; this module chooses what peft does not: the base stays in its 16-bit (or 4-bit)
dtype while every trainable tensor is fp32 (:func:`prepare_for_training` skips peft's upcast of the whole
base, several GB on an 8B model), tied embeddings stay tied when they are trained, adapters load only from
safetensors, and LoRA dropout draws its mask faster on the CPU (:class:`CPUDropout`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
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
        # (activation_* since transformers 5: the gradient_* names are deprecated aliases that warn)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.config.use_cache = False
    return model


def checkpointing_on(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on, read through transformers 5's name
    (``is_activation_checkpointing``) when the model has it: the old one warns."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):  # looked up on the class: reading the property is what warns
            return bool(getattr(model, name))
    return False


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft's wrapping of a transformers 5 model: peft reads the deprecated ``is_gradient_checkpointing``
    property (``getattr(model, "is_gradient_checkpointing", True)`` in ``PeftModel.__init__``), which warns on
    every call whatever its value; that one FutureWarning, not ours to fix, is ignored here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


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


def apply_lora(
    model: Any,
    config: AdapterConfig | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int = 1,
    trainable_tokens: Sequence[int] | None = None,
    **overrides: Any,
) -> Any:
    """Attach a LoRA adapter (peft) to ``model`` and return the ``PeftModel``.

    ``overrides`` replace single fields of ``config``. Freezes the base and turns on gradient checkpointing
    when asked (:func:`prepare_for_training`; ``gradient_checkpointing='auto'`` asks the memory planner
    whether a step of ``batch_size`` blocks of ``seq_len`` tokens (default: the model's context, at most
    2048) fits the free memory without it, and logs the choice), checks that explicit ``target_modules`` exist (naming the
    linear layers that do), and with ``train_embeddings`` trains the input embeddings and the output head in
    full (``modules_to_save``), keeping tied weights tied. ``trainable_tokens`` (token ids, e.g. the new
    tokens of :func:`lora_dapt.model.vocab.add_token_rows`) trains only those rows of the input embeddings
    and of the head (peft ``trainable_token_indices``; one shared copy when tied); with ``train_embeddings``
    the whole matrices train instead. Trainable tensors are fp32. Logs trainable / total parameters.

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

    from ..planning.checkpointing import choose_gradient_checkpointing

    if seq_len is None:
        seq_len = min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)
    choice = choose_gradient_checkpointing(model, cfg, seq_len=seq_len, batch_size=batch_size)
    log.info("%s", choice.reason)
    prepare_for_training(model, gradient_checkpointing=choice.enabled)

    modules_to_save = None
    token_indices = None
    tie = False
    emb = _module_name(model, model.get_input_embeddings())
    head = _module_name(model, model.get_output_embeddings())
    if cfg.train_embeddings:
        modules_to_save = [n for n in (emb, head) if n]
        tie = tied_embeddings(model)
    elif trainable_tokens:
        tie = tied_embeddings(model)
        ids = sorted(int(i) for i in trainable_tokens)
        # tied: peft wraps the head with the embedding's adapter (ensure_weight_tying), one copy of the rows
        token_indices = {emb: ids} if tie or not head else {emb: ids, head: ids}

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
        trainable_token_indices=token_indices,
        ensure_weight_tying=tie,
        init_lora_weights=cfg.init_lora_weights,
    )
    with peft_wrapping():
        peft_model = get_peft_model(model, lora_cfg)
    _trainable_to_fp32(peft_model)
    trainable, total = count_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%g on %s%s: %s trainable of %s parameters (%.3f%%)",
        cfg.r,
        cfg.alpha,
        cfg.target_modules if isinstance(cfg.target_modules, str) else ",".join(cfg.target_modules),
        " + embeddings/head" if cfg.train_embeddings else (" + new token rows" if token_indices else ""),
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
        with peft_wrapping():
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
