"""Model FLOPs per trained token, the device's measured matmul peak, and model FLOPs utilisation (MFU).

What a LoRA step computes, per position of a packed block (N = the base's matmul parameters: every linear
layer of the decoder, plus the output head; the embedding lookup is a gather, not a matmul):

* forward ``2 N``; backward through the frozen base ``2 N`` (input gradients only: frozen weights get no
  weight gradients, so the usual ``6 N`` is ``4 N`` here); LoRA ``6 N_lora`` (forward, input and weight
  gradients);
* gradient checkpointing recomputes each decoder layer's forward in the backward pass: ``2 N_layers +
  2 N_lora`` and the attention forward once more (the head is outside the checkpointed layers);
* attention as the packing really does it: causal within each document, so a document of ``D`` tokens
  attends ``D (D + 1) / 2`` query-key pairs (not ``seq**2`` for the block); each pair costs ``4 head_dim``
  FLOPs per query head forward (scores and the weighted sum) and twice that backward;
* the head only sees trained positions (lora_dapt's loss skips the rest), so it is counted per trained
  token; everything else is counted per position and divided by the trained tokens.

Counting the recompute makes this what PaLM calls hardware FLOPs rather than model FLOPs when checkpointing
is on; :class:`TokenFlops` keeps every term apart, so either can be reported.

The peak is a measured rate, not a datasheet number: a second of square ``torch.matmul`` in the compute dtype
on the device (:func:`measure_matmul_peak`), cached per machine in ``$LORA_DAPT_CACHE/peak_flops.json``
(keyed by device, CPU model, thread count, dtype and torch version). Benchmarks measure it; a run's summary
reads the cache and measures only when that costs under :data:`SUMMARY_MEASURE_BUDGET_S`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("lora_dapt")

PEAK_MATMUL_SIZE = 2048
"""Side of the square matmuls the peak is measured with."""

SUMMARY_MEASURE_BUDGET_S = 2.0
"""The most seconds a run's summary may spend measuring a peak that is not cached yet."""

SAMPLE_BLOCKS = 64
"""Blocks read (evenly spaced) to find the documents' lengths and the trained share of a training set."""


@dataclass(frozen=True)
class TokenFlops:
    """Model FLOPs per trained token, by term (see the module docstring); :attr:`total` is their sum."""

    forward: float
    """``2 N`` over the decoder's linear layers and the head."""
    backward: float
    """``2 N``: input gradients through the frozen base."""
    lora: float
    """``6 N_lora`` (plus the head's weight gradient, ``2 N_head``, when the head is trained)."""
    attention: float
    """Query-key scores and weighted sums, forward and backward, within each document."""
    recompute: float = 0.0
    """The decoder layers' forward once more (LoRA and attention included) under gradient checkpointing."""

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.lora + self.attention + self.recompute

    def to_dict(self) -> dict[str, float]:
        """The terms and the total, as a JSON-ready dict."""
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class BlockSample:
    """What the FLOPs of a training set depend on, read from some of its blocks."""

    positions: int
    """Positions in the sampled blocks (every one runs through the decoder)."""
    trained: int
    """Positions whose next token is trained (labels[1:] != -100): what tokens/s counts."""
    attention_pairs: int
    """Causal query-key pairs within the documents: sum of ``D (D + 1) / 2``."""


@dataclass(frozen=True)
class PeakFlops:
    """A device's measured matmul rate in one dtype."""

    flops_per_s: float
    dtype: str
    source: str
    """'cached' (read from the cache file) or 'measured' (just now, then cached)."""
    key: str
    """The cache key: device, CPU model, threads, dtype, torch version."""


def attention_pairs(lengths: list[int]) -> int:
    """Causal query-key pairs of documents of these lengths: ``sum(D * (D + 1) / 2)``.

    >>> attention_pairs([3, 2]), attention_pairs([5])
    (9, 15)
    """
    return sum(d * (d + 1) // 2 for d in lengths)


def sample_blocks(dataset: Any, max_blocks: int = SAMPLE_BLOCKS) -> BlockSample:
    """:class:`BlockSample` of up to ``max_blocks`` evenly spaced blocks of a packed training set (columns
    ``input_ids``, ``labels`` and, when packed, ``position_ids``: without them a row is one document)."""
    from ..model.attention import document_lengths

    n = len(dataset)
    step = max(1, n // max_blocks)
    positions = trained = pairs = 0
    for i in range(0, n, step)[:max_blocks]:
        row = dataset[i]
        length = len(row["input_ids"])
        positions += length
        trained += sum(1 for y in row["labels"][1:] if y != -100)
        pos = row.get("position_ids")
        lengths = document_lengths(torch.tensor(pos))[0] if pos is not None else [length]
        pairs += attention_pairs(lengths)
    return BlockSample(positions=positions, trained=trained, attention_pairs=pairs)


def flops_per_token(
    shape: Any,
    lora_params: int,
    sample: BlockSample,
    *,
    gradient_checkpointing: bool,
    trained_head: bool = False,
) -> TokenFlops:
    """Model FLOPs per trained token of a LoRA step.

    Args:
        shape: the base's :class:`~lora_dapt.planning.shapes.ModelShape` (or anything ``model_shape`` reads).
        lora_params: trainable LoRA parameters (``N_lora``).
        sample: positions, trained positions and attention pairs of the training blocks (:func:`sample_blocks`).
        gradient_checkpointing: whether the decoder layers' forward is recomputed in the backward pass.
        trained_head: whether the output head itself is trained (``adapter.train_embeddings``).

    Example: one block of 512 tokens, one document, every position trained but the first:
    ``flops_per_token(shape, n_lora, BlockSample(512, 511, 512 * 513 // 2), gradient_checkpointing=False)``.
    """
    from ..planning.shapes import model_shape

    s = model_shape(shape)
    layers = s.linear_params  # every decoder linear layer (the head excluded)
    head = s.vocab_size * s.hidden_size
    trained = max(sample.trained, 1)
    per_position = sample.positions / trained  # positions run through the decoder per trained token
    # one query-key pair: 2 head_dim for the score, 2 head_dim for the weighted sum, per query head and layer
    pair = 4 * s.head_dim * s.num_heads * s.num_layers
    attn_forward = pair * sample.attention_pairs / trained
    recompute = 0.0
    if gradient_checkpointing:
        recompute = 2 * (layers + lora_params) * per_position + attn_forward
    return TokenFlops(
        forward=2 * layers * per_position + 2 * head,
        backward=2 * layers * per_position + 2 * head,
        lora=6 * lora_params * per_position + (2 * head if trained_head else 0),
        attention=3 * attn_forward,  # backward: twice the forward (dQ, dK, dV and the scores' gradient)
        recompute=recompute,
    )


def model_flops_per_token(model: Any, dataset: Any) -> TokenFlops:
    """:func:`flops_per_token` of a LoRA model (peft) training on ``dataset``: its shape, trainable LoRA
    parameters, whether it checkpoints and whether its head is trained, read from the model itself."""
    from ..model.lora import base_model, checkpointing_on
    from ..planning.shapes import model_shape

    base = base_model(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    head = base.get_output_embeddings()
    trained_head = head is not None and any(p.requires_grad for p in head.parameters())
    return flops_per_token(
        model_shape(model),
        lora,
        sample_blocks(dataset),
        gradient_checkpointing=checkpointing_on(base),
        trained_head=trained_head,
    )


# -------------------------------------------------------------------------------------------------------------
# The peak: measured once per machine and dtype, cached
# -------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_key(device: torch.device | str, dtype: torch.dtype) -> str:
    """The cache key of a peak: device (the GPU's name on CUDA), CPU model, threads, dtype, torch version."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{name} | {_cpu_model()} | {torch.get_num_threads()} threads | {dtype_name} | torch {torch.__version__}"


def peak_cache_path() -> Path:
    """``$LORA_DAPT_CACHE/peak_flops.json`` (default ``~/.cache/lora_dapt/peak_flops.json``)."""
    from ..model.gguf import cache_root

    return cache_root() / "peak_flops.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    device: torch.device | str, dtype: torch.dtype, *, size: int = PEAK_MATMUL_SIZE, seconds: float = 1.0
) -> float:
    """FLOP/s of square ``size`` matmuls in ``dtype`` on ``device``: the best of repeated timings over about
    ``seconds`` (the best, so that a busy moment does not lower the peak)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
    torch.matmul(a, b)  # warm-up: kernel selection, thread pool
    _sync(dev)
    best, spent = float("inf"), 0.0
    reps = 1 if dev.type == "cpu" else 10
    while best == float("inf") or spent < seconds:  # at least one timing
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        _sync(dev)
        dt = time.perf_counter() - t
        best, spent = min(best, dt / reps), spent + dt
    return 2 * size**3 / max(best, 1e-12)


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return (
        {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
        if isinstance(data, dict)
        else {}
    )


def _write_cache(path: Path, key: str, flops: float) -> None:
    # the best rate seen is kept: a measurement on a busy machine must not lower the peak for later runs
    data = _read_cache(path)
    data[key] = max(flops, data.get(key, 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)  # atomic: two runs measuring at once leave one whole file


def matmul_peak(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    measure: bool | float = True,
    refresh: bool = False,
    cache_path: Path | None = None,
) -> PeakFlops | None:
    """The device's matmul peak in ``dtype``: cached when known, else measured (and cached).

    Args:
        measure: True: measure when not cached; False: cached only (None when absent); a number of seconds:
            measure only when a quick probe predicts it costs less than that (a run's summary uses
            :data:`SUMMARY_MEASURE_BUDGET_S`).
        refresh: measure again even when cached (benchmarks do, once per run); the cache keeps the higher of
            the two rates, and so does the returned value.
        cache_path: the cache file (default :func:`peak_cache_path`).
    """
    path = cache_path or peak_cache_path()
    key = peak_key(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    if not refresh:
        cached = _read_cache(path).get(key)
        if cached:
            return PeakFlops(cached, dtype_name, "cached", key)
    if measure is False:
        return None
    seconds = 1.0
    if measure is not True:
        # a probe (one 512^3 matmul, after a warm-up) predicts what the measurement would cost
        probe = 2 * 512**3 / max(measure_matmul_peak(device, dtype, size=512, seconds=0.0), 1.0)
        predicted = 2 * probe * (PEAK_MATMUL_SIZE / 512) ** 3  # warm-up and one timed matmul at least
        if predicted + seconds > float(measure):
            log.info("matmul peak not measured: it would take about %.1f s", predicted + seconds)
            return None
        seconds = min(seconds, float(measure) - predicted)
    flops = max(measure_matmul_peak(device, dtype, seconds=seconds), _read_cache(path).get(key, 0.0))
    try:
        _write_cache(path, key, flops)
    except OSError as e:  # a read-only home: the number is still good for this run
        log.warning("could not cache the matmul peak in %s: %s", path, e)
    return PeakFlops(flops, dtype_name, "measured", key)


# -------------------------------------------------------------------------------------------------------------
# MFU
# -------------------------------------------------------------------------------------------------------------


def mfu(tokens_per_s: float, flops: TokenFlops | float, peak: PeakFlops | float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (trained tokens/s x FLOPs per trained token) over the peak.

    >>> round(mfu(100.0, 8e8, 6.6e11), 4)
    0.1212
    """
    per_token = flops.total if isinstance(flops, TokenFlops) else float(flops)
    rate = peak.flops_per_s if isinstance(peak, PeakFlops) else float(peak)
    return tokens_per_s * per_token / rate


def utilisation(flops: TokenFlops, tokens_per_s: float, peak: PeakFlops | None) -> dict[str, Any]:
    """The run summary's fields: ``model_flops_per_token``, ``achieved_tflops``, ``peak_tflops`` (None when
    no peak is known), ``peak_source`` ('cached', 'measured', or why none) and ``mfu`` (None without a peak)."""
    achieved = tokens_per_s * flops.total
    return {
        "model_flops_per_token": flops.total,
        "flops_terms": flops.to_dict(),
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak.flops_per_s / 1e12 if peak else None,
        "peak_source": f"{peak.source}: {peak.key}"
        if peak
        else "not cached, and measuring would take too long",
        "mfu": achieved / peak.flops_per_s if peak else None,
    }


def run_utilisation(
    model: Any, dataset: Any, tokens_per_s: float, compute_dtype: str | None
) -> dict[str, Any]:
    """:func:`utilisation` of a finished training run: the model's FLOPs per trained token on ``dataset``
    against the cached peak of its device in ``compute_dtype`` (measured when that costs under
    :data:`SUMMARY_MEASURE_BUDGET_S`)."""
    device = next(model.parameters()).device
    dtype = getattr(torch, compute_dtype or "float32", torch.float32)
    flops = model_flops_per_token(model, dataset)
    return utilisation(flops, tokens_per_s, matmul_peak(device, dtype, measure=SUMMARY_MEASURE_BUDGET_S))
