"""Honest gain and forgetting: the ORIGINAL 16-bit model, and the adapter on it, scored beside the 4-bit run.

A QLoRA run trains against the NF4 rounding of its base, and NF4 itself costs perplexity (SmolLM2-135M: bf16
domain 18.05, general 33.40; its NF4 copy 22.04 / 42.35). Against the 4-bit base the adapter looks better
than it is, because it learns back part of the quantization loss, general perplexity included. What a user
gains and gives up is measured against the model they would otherwise use, the original 16-bit one, and
the model they ship is the adapter merged into it. So for a quantized run:

* before training, the original model is loaded unquantized (:func:`original_plan`: its checkpoint's own
  dtype where the device computes it, else float32; a GGUF source: its dequantized copy as transformers
  loads it) and scored on the same domain blocks and general texts (:func:`score_original`);
* after training, the saved adapter is attached to that 16-bit base (what ``lora-dapt merge`` merges into)
  and scored the same way.

Each time the 16-bit model is freed right after scoring. It is loaded only when it fits: its size (weights
x bytes per weight, from a meta-device copy: no memory) plus a margin must be below the free memory of the
device (GPU memory, else available RAM) next to the 4-bit model training keeps; otherwise the summary says
it could not, and why. A run whose base is already 16-bit (quantization 'none') is its own original: it is
not scored twice. These scores are not logged as metrics rows (the rows are the model as trained); they
are in ``eval_before.json`` and the summary, under :data:`ORIGINAL`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import EvalConfig
from ..errors import ConfigError
from ..model.load import ModelSource
from ..planning.available import free_memory_bytes

log = logging.getLogger("lora_dapt")

ORIGINAL = "original_16bit"
"""The key of the 16-bit scores in a before / after evaluation dict (beside 'domain', 'general')."""

MEMORY_MARGIN = 1.25
"""The 16-bit model needs its weights' bytes times this (activations, allocator slack) to count as fitting."""


@dataclass(frozen=True)
class OriginalPlan:
    """Whether the original 16-bit model is scored, in which dtype, and why (or why not)."""

    scored: bool
    reason: str
    """What was decided and why ('fits: 0.51 GiB needed, 12.3 GiB free', 'the base is 16-bit', ...)."""
    dtype: str | None = None
    bytes_needed: int | None = None
    bytes_free: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usable_dtype(stored: str, device: torch.device) -> str:
    """The dtype the original is scored in: its checkpoint's own (``stored``) where the device computes it
    natively, else float32 (float16 on the CPU; bfloat16 on a CPU without AVX512-BF16/AMX or an old GPU)."""
    from ..model.load import cpu_has_native_bf16

    if stored == "bfloat16":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        return stored if native else "float32"
    if stored == "float16":
        return stored if device.type == "cuda" else "float32"
    return "float32"


def _size(source: ModelSource, trust_remote_code: bool) -> tuple[int, str]:
    """(parameters of the original model, the dtype its checkpoint stores): from a meta-device copy."""
    from ..export.checks import count_weights, meta_model
    from ..export.measure import model_dtype
    from ..model.load import resolve_model_source

    name, gguf = source.loadable()
    config, meta = meta_model(resolve_model_source(name, gguf), trust_remote_code)
    return count_weights(meta, None), model_dtype(config)


def original_plan(
    source: ModelSource,
    cfg: EvalConfig,
    device: torch.device,
    *,
    trust_remote_code: bool = False,
    free_memory: Callable[[torch.device], int] | None = None,
) -> OriginalPlan:
    """Decide whether the original 16-bit model of ``source`` is scored (``eval.original_base``).

    ``free_memory(device)`` is what the estimate is compared with (default :func:`free_memory_bytes`). ``original_base: true`` that cannot fit is a :class:`ConfigError` saying what it
    needs and how much is free.
    """
    if cfg.original_base is False or not cfg.enabled:
        return OriginalPlan(False, "eval.original_base is false")
    if not source.quantized:
        return OriginalPlan(False, "the base is 16-bit (quantization 'none'): its scores are the original's")
    n, stored = _size(source, trust_remote_code)
    dtype = usable_dtype(stored, device)
    need = int(n * torch.finfo(getattr(torch, dtype)).bits // 8 * MEMORY_MARGIN)
    free = int((free_memory or free_memory_bytes)(device))
    gib = 2**30
    sizes = f"{n:,} parameters in {dtype}: {need / gib:.2f} GiB needed, {free / gib:.2f} GiB free on {device}"
    if need > free:
        reason = (
            f"the original 16-bit model does not fit in memory beside the 4-bit one ({sizes}); the figures "
            "are against the 4-bit base only. Score it later on a larger machine, or set "
            "eval.original_base: false to silence this"
        )
        if cfg.original_base is True:
            raise ConfigError(f"eval.original_base = true: {reason}")
        log.warning("%s", reason)
        return OriginalPlan(False, reason, dtype, need, free)
    return OriginalPlan(True, f"fits ({sizes})", dtype, need, free)


def load_original(
    source: ModelSource, dtype: str, device: torch.device, trust_remote_code: bool
) -> tuple[Any, Any]:
    """(model, its own tokenizer): the original model of ``source`` unquantized in ``dtype`` (a GGUF: its
    dequantized copy), the way the merge loads its 16-bit base
    (:func:`~lora_dapt.export.job.trained_settings`, then :func:`~lora_dapt.model.load.load_base_model_from`
    with quantization None)."""
    from ..export.job import trained_settings
    from ..model.load import load_base_model_from

    name, gguf = source.loadable()
    trained = trained_settings(name, source).replace(gguf_file=gguf, trust_remote_code=trust_remote_code)
    loaded = load_base_model_from(trained, quantization=None, compute_dtype=dtype, device=str(device))
    return loaded.model, loaded.tokenizer


def score_original(
    source: ModelSource,
    plan: OriginalPlan,
    score: Callable[[Any, Any], dict[str, Any]],
    *,
    device: torch.device,
    adapter_dir: str | Path | None = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load the original (with the adapter saved in ``adapter_dir`` attached, when given), run
    ``score(model, own_tokenizer)`` on it (the run's split evaluation: returns ``{"domain": ...,
    "general": ...}``), free it; return the scores with ``dtype``, ``model`` ('original' or 'original +
    adapter') and ``tokenizer`` ('run' or 'base') added.

    ``tokenizer`` is the run's. When it has tokens the original lacks (``adapter.new_tokens``), the original
    alone is the model without them: ``own_tokenizer`` is then the original's tokenizer, and ``score``
    must tokenize with it (per-token figures of the two sides count different tokens: compare bits per
    byte). With the adapter, the original is first grown for the run's tokenizer as training grew its base
    (:func:`~lora_dapt.model.vocab.add_token_rows`; the adapter's rows then replace the new ones) and
    ``own_tokenizer`` is None: the run's tokenizer and blocks apply."""
    model, base_tokenizer = load_original(source, plan.dtype or "float32", device, trust_remote_code)
    what, own = "original", None
    grown = tokenizer is not None and len(tokenizer) > len(base_tokenizer)
    if grown and adapter_dir is None:
        own = base_tokenizer
    elif grown:
        from ..model.vocab import add_token_rows

        add_token_rows(model, base_tokenizer, tokenizer)
    if adapter_dir is not None:
        from peft import PeftModel

        from ..model.lora import peft_wrapping

        with peft_wrapping():  # peft reads a deprecated transformers property (one FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        what = "original + adapter"
    try:
        log.info("scoring the %s model (16-bit, %s)", what, plan.dtype)
        out = score(model, own)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {**out, "dtype": plan.dtype, "model": what, "tokenizer": "base" if own is not None else "run"}
