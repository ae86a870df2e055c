"""``train.compile``: torch.compile for the training steps, where it pays.

What gets compiled (regional compilation, for training only):

* each decoder layer's ``forward`` (:func:`compiled_layers`). Every layer of a model runs the same code, so
  a few graphs serve them all (before and after the eager attention; blocks with and without a document
  boundary): about half a minute once on 2 CPU cores, and inductor caches them on disk for the next run.
  Per-document attention stays eager (its loop over documents has a shape per document); what gets fused
  is RMSNorm's casts, rotary embeddings, the residual adds, SiLU x up and peft's copies around the 4-bit
  matmuls;
* each chunk of the frozen head's loss (``causal_lm_loss_sum(..., compiled_head=True)``): log-softmax, exp,
  one-hot and casts in one pass over the logits.

Evaluations during training run eagerly (:func:`eager`), so they compile nothing, and the layers are eager
again once training ends. On this 2-core CPU a SmolLM2-135M QLoRA step runs about 1.3x faster compiled
(BENCHMARKS.md); the compile costs about 30 s the first time, so ``auto`` compiles only runs estimated at
:data:`MIN_TRAIN_S` or more. On CUDA ``auto`` stays eager: it was not measured there (``true`` tries it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..errors import ConfigError

MIN_TRAIN_S = 300.0
"""'auto' compiles runs whose eager training is estimated at this many seconds or more (the compile costs
about 30 s once; steps ~1.3x faster repay it within the first two minutes of a SmolLM2 run here)."""

EAGER_MFU = 0.15
"""The model FLOPs utilisation assumed for the estimate: what eager QLoRA training reaches on this CPU
(BENCHMARKS.md: 14%)."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CompileChoice:
    """Whether to compile, and why (the sentence lora_dapt logs)."""

    enabled: bool
    reason: str


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) transformers model, in order; [] when it has no ``layers`` list."""
    from ..model.lora import base_model

    base = base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


@functools.cache
def compiler_problem() -> str | None:
    """Why torch.compile cannot run here (None when it can), found by compiling one tiny function once per
    process (a few seconds the first time; inductor caches it on disk)."""
    if not hasattr(torch.compiler, "set_stance"):
        return f"torch {torch.__version__} has no torch.compiler.set_stance (torch >= 2.6 needed)"
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1, dynamic=False)
        probe(torch.ones(8))
    except Exception as e:  # noqa: BLE001 - any failure means: do not compile
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"torch.compile failed on a probe ({type(e).__name__}: {first[:200]})"
    return None


def estimate_train_seconds(
    tokens: int, flops_per_token: float, peak_flops_per_s: float | None
) -> float | None:
    """Eager training time of ``tokens`` at :data:`EAGER_MFU` of the matmul peak (None without a peak)."""
    if not peak_flops_per_s:
        return None
    return tokens * flops_per_token / (peak_flops_per_s * EAGER_MFU)


def choose_compile(
    setting: bool | str,
    model: Any,
    *,
    train_tokens: int,
    flops_per_token: float,
    peak_flops_per_s: float | None,
) -> CompileChoice:
    """Resolve ``train.compile`` for a run of ``train_tokens`` on ``model``'s device.

    True/False are kept (True raises :class:`~lora_dapt.errors.ConfigError` when torch.compile cannot run
    here, or the model has no decoder layers to compile). 'auto' compiles on the CPU when the probe compiles
    and the eager run is estimated (:func:`estimate_train_seconds`) at :data:`MIN_TRAIN_S` or more.
    """
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"train.compile must be true, false or 'auto', not {setting!r}")
    if setting is False:
        return CompileChoice(False, "torch.compile off (train.compile=false)")
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    if setting is True:
        problem = compiler_problem() or (
            None if layers else "the model has no decoder `layers` list to compile"
        )
        if problem:
            raise ConfigError(f"train.compile=true: {problem}; set train.compile to false or 'auto'")
        return CompileChoice(
            True, f"torch.compile on (train.compile=true): {len(layers)} decoder layers and the loss"
        )
    if device.type != "cpu":
        return CompileChoice(
            False,
            f"torch.compile off (train.compile=auto): measured on the CPU only; train.compile=true tries it on "
            f"{device.type}",
        )
    if not layers:
        return CompileChoice(
            False, "torch.compile off (train.compile=auto): no decoder `layers` list to compile"
        )
    seconds = estimate_train_seconds(train_tokens, flops_per_token, peak_flops_per_s)
    if seconds is None:
        return CompileChoice(
            False, "torch.compile off (train.compile=auto): no matmul peak to estimate the run's length"
        )
    if seconds < MIN_TRAIN_S:
        return CompileChoice(
            False,
            f"torch.compile off (train.compile=auto): about {seconds / 60:.1f} min of training estimated, under "
            f"the {MIN_TRAIN_S / 60:.0f} min that repay a compile",
        )
    problem = compiler_problem()
    if problem:
        return CompileChoice(False, f"torch.compile off (train.compile=auto): {problem}")
    return CompileChoice(
        True,
        f"torch.compile on (train.compile=auto): about {seconds / 60:.0f} min of training estimated; compiling "
        f"the {len(layers)} decoder layers and the loss costs about half a minute once",
    )


def choose_for_run(
    setting: bool | str, model: Any, train_ds: Any, train_tokens: int, compute_dtype: str | None
) -> CompileChoice:
    """:func:`choose_compile` for a run of ``train_tokens`` on ``train_ds``: model FLOPs per token from its
    blocks (:mod:`lora_dapt.train.flops`) and the device's cached matmul peak (measured when that costs
    under ``SUMMARY_MEASURE_BUDGET_S``), read only when 'auto' on the CPU needs them."""
    flops, peak = 0.0, None
    if setting == "auto" and next(model.parameters()).device.type == "cpu":
        from .flops import SUMMARY_MEASURE_BUDGET_S, matmul_peak, model_flops_per_token

        flops = model_flops_per_token(model, train_ds).total
        dtype = getattr(torch, compute_dtype or "float32", torch.float32)
        found = matmul_peak("cpu", dtype, measure=SUMMARY_MEASURE_BUDGET_S)
        peak = found.flops_per_s if found is not None else None
    return choose_compile(
        setting, model, train_tokens=train_tokens, flops_per_token=flops, peak_flops_per_s=peak
    )


@contextlib.contextmanager
def compiled_layers(model: Any) -> Iterator[int]:
    """Inside: every decoder layer's ``forward`` is torch.compile'd (one shared compile); on exit they are the
    layers' own eager ``forward`` again. Yields how many layers were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = torch.compile(layer.forward)  # an instance attribute over the class's forward
    try:
        yield len(layers)
    finally:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward


def eager(fn: F) -> F:
    """``fn`` with torch.compile'd code inside it running eagerly (evaluations during a compiled run)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
