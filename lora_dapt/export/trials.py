"""The dtypes a merge tries: per dtype, the adapter on the base loaded in it, merged in place, measured.

:func:`try_dtypes` is step 2 and 3 of :func:`~lora_dapt.export.merge.merge_adapter`: for each candidate dtype
(:func:`~lora_dapt.export.measure.dtype_candidates`) score the adapter on the 16-bit base as trained (a, the
first time) and in that dtype (b), measure what rounding ``W + BA`` to it erases of the update, merge with
peft (``merge_and_unload(safe_merge=True)``), score the merged model in memory, and save the one that counts
into ``OUTPUT.partial``. The reload from disk and the report are merge.py's.
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MergeConfig, ModelConfig
from ..errors import MergeError
from ..model.bnb import load_dequantized, quantized_linears
from ..model.load import DTYPES, load_base_model_from
from .checks import check_disk_space
from .job import DTYPE_BYTES, MergeJob
from .measure import FP16_MAX, UpdateRounding, dtype_candidates, max_abs_diff, score, update_rounding
from .report import DtypeTrial, LossResult

log = logging.getLogger("lora_dapt")


@dataclass
class AdapterScores:
    """The adapter before merging: losses (a) and (b), the kept logits of (a) and (b), and how far the adapter
    moves the 16-bit base's logits."""

    losses: dict[str, LossResult | None]
    logits_4bit: torch.Tensor | None
    logits_16bit: torch.Tensor
    adapter_effect: float

    @property
    def reference(self) -> LossResult:
        """The loss of (b), the adapter on the 16-bit base the merge goes into."""
        return self.losses.get("adapter_16bit_dequantized") or self.losses["adapter_16bit_original"]


@dataclass
class Saved:
    """The merge kept in ``OUTPUT.partial``: its dtype, the adapter's scores in that dtype, whether it ties
    embeddings and head; plus every dtype tried and the one that would pass after an explicit dtype failed."""

    dtype: str
    scores: AdapterScores
    tied: bool
    trials: list[DtypeTrial]
    would_pass: str | None


# ---------------------------------------------------------------------------------------------------------------
# 2. Per dtype tried: the adapter on the base in that dtype, merged, measured in memory
# ---------------------------------------------------------------------------------------------------------------


def try_dtypes(
    job: MergeJob,
    cfg: MergeConfig,
    trained: ModelConfig,
    staging: Path,
    compare_tokens: int,
    max_shard_size: str | int,
) -> Saved:
    """Merge in each candidate dtype until one keeps the adapter; save the one that counts into ``staging``.

    'auto' tries the base's own dtype, then the wider ones (:func:`dtype_candidates`), and saves the first that
    passes (the last tried when none does). An explicit dtype is saved whether it passes or not; when it
    fails, the wider dtypes are measured (not saved) so the error can name one that passes.

    Each trial loads the base afresh in its dtype and merges into it (re-merging, rather than merging once in
    float32 and casting): one model in the trial's dtype is in memory at a time, the first trial costs what a
    merge always cost, and each trial compares with the adapter on the base in the same dtype, so the
    difference measured is the merge's rounding, not the compute dtype's.
    """
    saved: Saved | None = None
    trials: list[DtypeTrial] = []
    first: AdapterScores | None = None
    max_weight = 0.0
    for dtype in dtype_candidates(cfg.dtype, job.base_dtype):
        if dtype == "float16" and max_weight > FP16_MAX:
            trials.append(
                DtypeTrial(dtype, False, skipped=f"a merged weight reaches {max_weight:.4g} > 65504")
            )
            continue
        merged, tied, trial, scores, rounding = _trial(job, cfg, trained, dtype, compare_tokens, first)
        first = first or scores
        max_weight = max(max_weight, rounding.max_abs_weight)
        trials.append(trial)
        last = dtype == "float32"
        if saved is None and (trial.passed or cfg.dtype != "auto" or last):
            check_disk_space(staging, job.weight_count * DTYPE_BYTES[dtype], dtype)
            _save(merged, job, staging, max_shard_size)
            saved = Saved(dtype, scores, tied, trials, None)
        del merged
        release(job.big)
        if trial.passed:
            break
    assert saved is not None  # float32 is always the last candidate
    if not trials[-1].passed or trials[-1].dtype == saved.dtype:
        return saved
    saved.would_pass = trials[-1].dtype
    return saved


def _trial(
    job: MergeJob,
    cfg: MergeConfig,
    trained: ModelConfig,
    dtype: str,
    compare_tokens: int,
    first: AdapterScores | None,
) -> tuple[Any, bool, DtypeTrial, AdapterScores, UpdateRounding]:
    """Score the adapter on the base in ``dtype``, merge it (in place), score the merged model in memory.
    The 4-bit model (a) and the adapter's effect are measured on the first trial only (``first`` is None)."""
    peft16, scores = _score_adapter(job, cfg, trained, dtype, compare_tokens, first)
    rounding = update_rounding(peft16, DTYPES[dtype])
    merged, tied = _merge(peft16, job, dtype)
    del peft16
    loss, logits = score(merged, job.sequences, compare_tokens)
    diff = max_abs_diff(scores.logits_16bit, logits)
    allowed = cfg.tolerance * max(1.0, float(scores.logits_16bit.abs().max()))
    ref = scores.reference
    rel = abs(loss.perplexity / ref.perplexity - 1) if ref.perplexity > 0 else float("inf")
    passed = math.isfinite(diff) and diff <= allowed and rel <= cfg.ppl_tolerance
    trial = DtypeTrial(
        dtype=dtype,
        passed=passed,
        max_abs_logit_diff=diff,
        allowed_logit_diff=allowed,
        perplexity_adapter=ref.perplexity,
        perplexity_merged=loss.perplexity,
        ppl_rel_diff=rel,
        update_erased=rounding.share_erased,
        lora_layers=rounding.layers,
        layers_mostly_erased=rounding.layers_mostly_erased,
        worst_layer=rounding.worst_layer,
        worst_layer_erased=rounding.worst_share,
    )
    log.info("merge dtype %s", trial.describe())
    return merged, tied, trial, scores, rounding


def _score_adapter(
    job: MergeJob,
    cfg: MergeConfig,
    trained: ModelConfig,
    dtype: str,
    compare_tokens: int,
    first: AdapterScores | None,
) -> tuple[Any, AdapterScores]:
    """Score the adapter on the quantized base as trained (a) and on the 16-bit base in ``dtype`` (b); return
    the 16-bit peft model (what gets merged) and the scores. (a) and the adapter's effect come from ``first``
    when given (a later trial).

    bitsandbytes repacks 4-bit weights in place for its CPU kernel on the first no-grad forward pass, after
    which dequantize_4bit returns garbage. So with base_source='dequantized' the 4-bit weights are copied into
    the 16-bit model before the 4-bit model runs; with 'original' the 4-bit model runs and is freed first, so
    the two are never in memory together.
    """
    losses: dict[str, LossResult | None] = {}
    logits_a = None if first is None else first.logits_4bit
    if first is not None and "adapter_4bit_as_trained" in first.losses:
        losses["adapter_4bit_as_trained"] = first.losses["adapter_4bit_as_trained"]
    model4 = None
    needs_4bit = first is None or cfg.base_source == "dequantized"
    if trained.quantization != "none" and needs_4bit:
        # The load of training (its attention choice aside: lora_dapt picks one, as merge always has).
        model4 = load_base_model_from(
            trained, name_or_path=job.source, gguf_file=None, attn_implementation=None
        ).model
        if cfg.base_source == "original":
            losses["adapter_4bit_as_trained"], logits_a = score(
                _attach(model4, job), job.sequences, compare_tokens
            )
            model4 = None
            release(job.big)

    model16 = load_base_model_from(
        trained,
        name_or_path=job.source,
        gguf_file=None,
        quantization=None,
        compute_dtype=dtype,
        device=str(job.device),
        attn_implementation="sdpa",
    ).model
    peft16 = _attach(model16, job)
    del model16
    logits_base = None
    if first is None:
        with peft16.disable_adapter():
            _, logits_base = score(peft16, job.sequences, compare_tokens)
    losses["adapter_16bit_original"], logits_b = score(peft16, job.sequences, compare_tokens)
    if model4 is not None:  # base_source == "dequantized"
        n = load_dequantized(peft16, quantized_linears(model4))
        log.info("replaced %d layers with their dequantized %s weights", n, trained.quantization)
        losses["adapter_16bit_dequantized"], logits_b = score(peft16, job.sequences, compare_tokens)
        if first is None:
            losses["adapter_4bit_as_trained"], logits_a = score(
                _attach(model4, job), job.sequences, compare_tokens
            )
        model4 = None
        release(job.big)
    effect = first.adapter_effect if first is not None else max_abs_diff(logits_b, logits_base)
    return peft16, AdapterScores(losses, logits_a, logits_b, effect)


def _attach(model: Any, job: MergeJob) -> Any:
    """The adapter on ``model`` (embeddings grown first when the adapter added tokens), for inference."""
    from peft import PeftModel

    if job.new_vocab:  # the rows training grew: the mean of the old ones (trained rows: in the adapter)
        from ..model.vocab import grow_embeddings

        grow_embeddings(model, job.new_vocab)
    try:
        return PeftModel.from_pretrained(model, str(job.adapter.load_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MergeError(f"peft could not load the adapter from {job.adapter.load_dir}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# 3. Merge (peft, in place) and save
# ---------------------------------------------------------------------------------------------------------------


def _merge(peft16: Any, job: MergeJob, dtype: str) -> tuple[Any, bool]:
    """Merge in place, refuse non-finite weights, keep tied weights tied; return the merged model and whether
    it ties embeddings and head."""
    try:
        merged = peft16.merge_and_unload(safe_merge=True)
    except ValueError as e:
        raise MergeError(f"merging {job.adapter_dir} failed: {e}") from None
    for name, p in merged.named_parameters():
        if not torch.isfinite(p).all():
            overflow = (
                " (float16's range is +-65504: merge with dtype='auto' or 'float32')"
                if dtype == "float16"
                else ""
            )
            raise MergeError(
                f"merged weight {name} has NaN/inf values in {dtype}{overflow}; else the adapter in "
                f"{job.adapter_dir} is broken"
            )
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    if tied:
        inp, head = merged.get_input_embeddings(), merged.get_output_embeddings()
        if inp.weight.data_ptr() != head.weight.data_ptr():
            if torch.equal(inp.weight, head.weight):
                head.weight = inp.weight
            else:
                # An adapter that trained the two copies apart: keep what was trained, untied.
                merged.config.tie_word_embeddings = False
                tied = False
                note = "the base ties embeddings and head, the adapter trained them apart: saved untied"
                if note not in job.notes:
                    job.notes.append(note)
    pad_id = job.tokenizer.pad_token_id
    merged.config.pad_token_id = pad_id
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.pad_token_id = pad_id
    return merged, tied


def _save(merged: Any, job: MergeJob, staging: Path, max_shard_size: str | int) -> None:
    """Save the merged model and the tokenizer into ``staging`` (replacing what is there)."""
    if staging.exists():
        shutil.rmtree(staging)
    merged.save_pretrained(staging, max_shard_size=max_shard_size)
    job.tokenizer.save_pretrained(staging)


def release(big: bool = True) -> None:
    """Give freed weights back (call after the last reference is deleted). A full ``gc.collect`` costs about
    half a second, so it is skipped for small models, whose memory does not matter."""
    if big:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
