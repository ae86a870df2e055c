"""Merge a LoRA/QLoRA adapter into a 16-bit model, and prove that the merged model is the trained one.

The merge itself is peft's ``merge_and_unload(safe_merge=True)``; what this module adds is everything around
it that users get wrong (transformers #31293, unsloth #1971 #4098, peft #2972):

* The base is always reloaded in 16-bit (or float32) before merging; merging into 4-bit weights would round
  most of the update away. ``base_source`` picks which 16-bit weights:

  - ``"original"``: the original checkpoint. The adapter was trained against the NF4 rounding of these
    weights, so the merged model differs a little from the model that was trained.
  - ``"dequantized"``: the 4-bit weights the adapter was trained on, dequantized. This reproduces the trained
    model, quantization error included.

  The report measures both against the 4-bit model as trained, so the user can choose with numbers.
* Fully trained embeddings / output head (peft ``modules_to_save``) are merged, and tied weights stay tied.
* The shipped folder is verified: it is reloaded with plain ``transformers`` (no peft) and its loss and logits
  on held-out text are compared with the adapter on the 16-bit base. A disagreement beyond ``tolerance``
  raises :class:`MergeError` and the folder is left at ``OUTPUT.partial`` for inspection, never at ``OUTPUT``.

:func:`merge_adapter` reads top to bottom: check (before any weights are loaded) -> evaluate the adapter
(4-bit as trained, 16-bit) -> merge and save -> reload and verify -> report.

Memory: the 4-bit model (about a quarter of the 16-bit size) is loaded first for the "as trained" numbers and
freed before the 16-bit base is loaded (kept alongside it only for ``base_source="dequantized"``); the merge is
in place and the merged model is freed before the saved copy is reloaded, so the peak is about one 16-bit
copy of the weights. Adapter files are read tensor by tensor, and ``adapter_model.bin`` pickles are only ever
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MergeConfig, ModelConfig
from ..errors import MergeError, ModelLoadError
from ..model.bnb import load_dequantized, quantized_linears
from ..model.load import ModelSource, load_base_model_from
from ..rundir import MERGE_REPORT, RunDir, write_json_atomic
from .job import MergeJob, check_settings, held_out_sequences, merge_settings, prepare_job, trained_settings
from .measure import max_abs_diff, score
from .report import LossResult, MergeReport, compare_bases

log = logging.getLogger("lora_dapt")

MAX_EVAL_TOKENS = 2048
"""Held-out next-token targets scored per model."""
MAX_EVAL_LEN = 512
"""Longest held-out sequence (tokens)."""
COMPARE_TOKENS = 256
"""Positions whose full logits are compared between models."""
MAX_SHARD_SIZE = "5GB"
"""safetensors shard size of the merged model."""


# ---------------------------------------------------------------------------------------------------------------
# State passed between the steps of merge_adapter
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _AdapterScores:
    """The adapter before merging: losses (a) and (b), the kept logits of (a) and (b), and how far the adapter
    moves the 16-bit base's logits."""

    losses: dict[str, LossResult | None]
    logits_4bit: torch.Tensor | None
    logits_16bit: torch.Tensor
    adapter_effect: float


@dataclass
class _Verification:
    """The reloaded merged model (c) against the adapter on the 16-bit base (b)."""

    loss: LossResult
    max_abs_logit_diff: float
    logit_scale: float
    tied: bool
    """The merged model ties embeddings and head, and the reloaded one does too."""
    passed: bool


# ---------------------------------------------------------------------------------------------------------------
# merge_adapter: 1. settings and checks (.job) -> 2. score the adapter -> 3. merge, save -> 4. verify -> 5. report
# ---------------------------------------------------------------------------------------------------------------


def merge_adapter(
    base: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    config: MergeConfig | None = None,
    *,
    trained_on: ModelSource | ModelConfig | None = None,
    eval_texts: Sequence[str] | None = None,
    eval_source: str | None = None,
    overwrite: bool = False,
    max_eval_tokens: int = MAX_EVAL_TOKENS,
    max_eval_len: int = MAX_EVAL_LEN,
    compare_tokens: int = COMPARE_TOKENS,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    **overrides: Any,
) -> Path:
    """Merge a LoRA adapter into a 16-bit copy of its base, verify the result, save it; return ``output_dir``.

    Args:
        base: the base model the adapter was trained on: a directory, a ``.gguf`` file, a directory with one
            GGUF file, or a hub id.
        adapter_dir: a peft ``save_pretrained`` directory (``continued_pretrain`` or ``sft`` output).
        output_dir: where the merged model goes; it loads with plain ``AutoModelForCausalLM``.
        config: the merge settings (dtype, base_source, tolerance); default ``MergeConfig()``.
        trained_on: how the base was loaded in training: the run's :class:`ModelSource` (``loaded.source``,
            ``RunDir.read_run_info()``) or its ``model`` section (a :class:`ModelConfig`). Its quantization,
            compute dtype and double_quant give the "as trained" numbers and ``base_source='dequantized'``;
            its device and trust_remote_code apply to every load; its gguf_file applies to ``base`` unless it
            names another model. None: the QLoRA defaults (``ModelConfig()``: NF4, double quantization).
        eval_texts: held-out texts for the check (the run's eval split when known). None: a few generic
            sentences, which still catch a broken merge but say little about domain quality.
        eval_source: how to describe ``eval_texts`` in the report.
        overwrite: replace an existing, non-empty ``output_dir``.
        max_eval_tokens, max_eval_len: how much held-out text is scored, and the longest sequence.
        compare_tokens: positions whose full logits are compared.
        max_shard_size: safetensors shard size of the merged model.
        **overrides: fields of ``config`` to replace, e.g. ``dtype="float32", tolerance=0.02``; checked like
            the config (an unknown key is a :class:`ConfigError` naming it).

    Raises:
        ConfigError: a bad setting (every one is listed).
        MergeError: corrupted or mismatched adapter, too little disk space, or a merge that does not verify
            (the unverified folder is left at ``OUTPUT.partial`` with its report).

    Example::

        merge_adapter("models/llama-3-8b", "runs/demo/adapter", "runs/demo/merged", dtype="bfloat16")
    """
    cfg = merge_settings(config, overrides)
    trained = trained_settings(base, trained_on)
    check_settings(cfg, trained)
    out = Path(output_dir)
    staging = out.with_name(out.name + ".partial")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(
            f"{out} exists and is not empty; choose another output directory or pass overwrite=True"
        )

    with tempfile.TemporaryDirectory(prefix="lora_dapt_adapter_") as tmp:  # a .bin adapter's safetensors copy
        job = prepare_job(base, Path(adapter_dir), out, cfg, trained, tmp)
        job.sequences, job.eval_source = held_out_sequences(
            job.tokenizer, eval_texts, eval_source, max_eval_tokens, max_eval_len
        )
        peft16, scores = _score_adapter(job, cfg, trained, compare_tokens)
        tied = _merge_and_save(peft16, job, staging, max_shard_size)
        del peft16
        _release(job.big)

    verified = _verify(staging, job, scores, cfg, tied, compare_tokens)
    report = _report(job, cfg, trained, scores, verified, out if verified.passed else staging)
    write_json_atomic(staging / MERGE_REPORT, report.to_dict())
    print(report.summary())
    if not verified.passed:
        raise MergeError(
            f"the merged model does not reproduce the adapter; NOT saved to {out}. Inspect {staging} and its "
            f"{MERGE_REPORT}:\n" + "\n".join(f"  - {p}" for p in job.notes)
        )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. The adapter before merging: (a) on the 4-bit base as trained, (b) on the 16-bit base
# ---------------------------------------------------------------------------------------------------------------


def _score_adapter(
    job: MergeJob, cfg: MergeConfig, trained: ModelConfig, compare_tokens: int
) -> tuple[Any, _AdapterScores]:
    """Score the adapter on the quantized base as trained (a) and on the 16-bit base (b); return the 16-bit
    peft model (what gets merged) and the scores.

    bitsandbytes repacks 4-bit weights in place for its CPU kernel on the first no-grad forward pass, after
    which dequantize_4bit returns garbage. So with base_source='dequantized' the 4-bit weights are copied into
    the 16-bit model before the 4-bit model runs; with 'original' the 4-bit model runs and is freed first, so
    the two are never in memory together.
    """
    losses: dict[str, LossResult | None] = {}
    logits_a = None
    model4 = None
    if trained.quantization != "none":
        # The load of training (its attention choice aside: lora_dapt picks one, as merge always has).
        model4 = load_base_model_from(
            trained, name_or_path=job.source, gguf_file=None, attn_implementation=None
        ).model
        if cfg.base_source == "original":
            losses["adapter_4bit_as_trained"], logits_a = score(
                _attach(model4, job), job.sequences, compare_tokens
            )
            model4 = None
            _release(job.big)

    model16 = load_base_model_from(
        trained,
        name_or_path=job.source,
        gguf_file=None,
        quantization=None,
        compute_dtype=cfg.dtype,
        device=str(job.device),
        attn_implementation="sdpa",
    ).model
    peft16 = _attach(model16, job)
    del model16
    with peft16.disable_adapter():
        _, logits_base = score(peft16, job.sequences, compare_tokens)
    losses["adapter_16bit_original"], logits_b = score(peft16, job.sequences, compare_tokens)
    if model4 is not None:  # base_source == "dequantized"
        n = load_dequantized(peft16, quantized_linears(model4))
        log.info("replaced %d layers with their dequantized %s weights", n, trained.quantization)
        losses["adapter_16bit_dequantized"], logits_b = score(peft16, job.sequences, compare_tokens)
        losses["adapter_4bit_as_trained"], logits_a = score(
            _attach(model4, job), job.sequences, compare_tokens
        )
        model4 = None
        _release(job.big)
    return peft16, _AdapterScores(losses, logits_a, logits_b, max_abs_diff(logits_b, logits_base))


def _attach(model: Any, job: MergeJob) -> Any:
    """The adapter on ``model`` (embeddings grown first when the adapter added tokens), for inference."""
    from peft import PeftModel

    if job.new_vocab:
        model.resize_token_embeddings(job.new_vocab)
    try:
        return PeftModel.from_pretrained(model, str(job.adapter.load_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MergeError(f"peft could not load the adapter from {job.adapter.load_dir}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# 3. Merge (peft, in place) and save
# ---------------------------------------------------------------------------------------------------------------


def _merge_and_save(peft16: Any, job: MergeJob, staging: Path, max_shard_size: str | int) -> bool:
    """Merge in place, refuse non-finite weights, keep tied weights tied, save model and tokenizer into
    ``staging``; return whether the saved model ties embeddings and head."""
    try:
        merged = peft16.merge_and_unload(safe_merge=True)
    except ValueError as e:
        raise MergeError(f"merging {job.adapter_dir} failed: {e}") from None
    for name, p in merged.named_parameters():
        if not torch.isfinite(p).all():
            raise MergeError(
                f"merged weight {name} has NaN/inf values; the adapter in {job.adapter_dir} is broken"
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
                job.notes.append(
                    "the base ties embeddings and head, the adapter trained them apart: saved untied"
                )
    pad_id = job.tokenizer.pad_token_id
    merged.config.pad_token_id = pad_id
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.pad_token_id = pad_id
    if staging.exists():
        shutil.rmtree(staging)
    merged.save_pretrained(staging, max_shard_size=max_shard_size)
    job.tokenizer.save_pretrained(staging)
    return tied


# ---------------------------------------------------------------------------------------------------------------
# 4. Verify: reload the saved folder without peft
# ---------------------------------------------------------------------------------------------------------------


def _verify(
    staging: Path, job: MergeJob, scores: _AdapterScores, cfg: MergeConfig, tied: bool, compare_tokens: int
) -> _Verification:
    """Reload ``staging`` with plain transformers and compare it with the adapter on the 16-bit base (b).

    It passes when the logits agree within ``tolerance`` x their scale, every weight loads by name, and tied
    weights came back tied; each failure is a note in the report.
    """
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(
        str(staging), dtype=job.dtype, output_loading_info=True, trust_remote_code=job.trust_remote_code
    )
    reloaded.to(job.device)
    missing = [k for k in info.get("missing_keys", []) if k]
    unexpected = [k for k in info.get("unexpected_keys", []) if k]
    loss, logits_c = score(reloaded, job.sequences, compare_tokens)
    reload_tied = (
        reloaded.get_input_embeddings().weight.data_ptr()
        == reloaded.get_output_embeddings().weight.data_ptr()
    )
    del reloaded
    _release(job.big)

    diff = max_abs_diff(scores.logits_16bit, logits_c)
    scale = max(1.0, float(scores.logits_16bit.abs().max()))
    if missing or unexpected:
        job.notes.append(
            f"reloading the merged model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    if tied and not reload_tied:
        job.notes.append("the merged model should tie embeddings and head, but the reloaded one does not")
    if diff > cfg.tolerance * scale:
        job.notes.append(
            f"merged logits differ from the adapter's by up to {diff:.4g} (> {cfg.tolerance:g} x {scale:.3g}); "
            + (
                "bf16/fp16 rounding of the merged weights can do this: try dtype='float32' or a larger tolerance"
                if cfg.dtype != "float32" and diff < 0.5 * scores.adapter_effect
                else "the merge did not keep the adapter"
            )
        )
    passed = diff <= cfg.tolerance * scale and not (missing or unexpected) and (reload_tied or not tied)
    return _Verification(loss, diff, scale, tied and reload_tied, passed)


# ---------------------------------------------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------------------------------------------


def _report(
    job: MergeJob,
    cfg: MergeConfig,
    trained: ModelConfig,
    scores: _AdapterScores,
    verified: _Verification,
    output_dir: Path,
) -> MergeReport:
    """Everything measured, as the report written beside the merged model."""
    quantization = None if trained.quantization == "none" else trained.quantization
    losses = {**scores.losses, "merged": verified.loss}
    closer, lower, advice = compare_bases(losses, cfg.base_source, quantization)
    return MergeReport(
        passed=verified.passed,
        base=job.base,
        resolved_base=str(job.source),
        adapter_dir=str(job.adapter_dir),
        output_dir=str(output_dir),
        dtype=cfg.dtype,
        base_source=cfg.base_source,
        trained_quantization=trained.quantization,
        eval_source=job.eval_source,
        eval_texts=len(job.sequences),
        eval_tokens=sum(len(s) - 1 for s in job.sequences),
        losses=losses,
        max_abs_logit_diff=verified.max_abs_logit_diff,
        logit_scale=verified.logit_scale,
        tolerance=cfg.tolerance,
        adapter_effect=scores.adapter_effect,
        max_abs_logit_diff_4bit_vs_16bit=(
            None if scores.logits_4bit is None else max_abs_diff(scores.logits_4bit, scores.logits_16bit)
        ),
        trained_embeddings=job.adapter.trained_embeddings,
        tied_embeddings=verified.tied,
        closer_to_trained=closer,
        lower_loss=lower,
        advice=advice,
        problems=job.notes,
    )


def _release(big: bool = True) -> None:
    """Give freed weights back (call after the last reference is deleted). A full ``gc.collect`` costs about
    half a second, so it is skipped for small models, whose memory does not matter."""
    if big:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# A run directory
# ---------------------------------------------------------------------------------------------------------------


def trained_base(run: RunDir) -> ModelConfig:
    """The base model of a run as training loaded it: the run's ``model`` section, with what ``run_info.json``
    recorded (the model actually loaded, its quantization and resolved compute dtype) taking precedence.

    The model is named as :meth:`ModelSource.loadable` says (the dequantized copy of a GGUF whose original
    moved away). MergeError when the run records no base at all.
    """
    model_cfg = run.read_section("model", ModelConfig)
    source = run.read_run_info()
    if source is not None:
        name, gguf = source.loadable()
        return model_cfg.replace(
            name_or_path=name,
            gguf_file=gguf,
            quantization=source.quantization,
            compute_dtype=source.compute_dtype,
        )
    if not model_cfg.name_or_path:
        raise MergeError(
            f"{run.path}: no base model recorded (run_info.json base_model or config.yaml model.name_or_path)"
        )
    return model_cfg


def merge_run(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    dtype: str | None = None,
    base_source: str | None = None,
    device: str | None = None,
    *,
    tolerance: float | None = None,
    overwrite: bool = False,
    eval_texts: Sequence[str] | None = None,
) -> Path:
    """Merge the adapter of a training run directory (DAPT or SFT); what ``lora-dapt merge RUN_DIR`` calls.

    Reads the run through :class:`RunDir`: the base as loaded in training (:func:`trained_base`), the ``merge``
    section of ``config.yaml`` for defaults, ``adapter/`` and the held-out split (``eval_texts.json``, used
    for the check). Arguments left as None take the run's settings; the output defaults to the merge
    section's output_dir, else ``RUN_DIR/merged``.

    Example::

        merge_run("runs/demo", dtype="bfloat16")   # -> Path("runs/demo/merged")
    """
    run = RunDir(Path(run_dir))
    if not run.has_adapter():
        raise ModelLoadError(
            f"{run.path} is not a finished run directory: {run.adapter_dir}/adapter_config.json is missing"
        )
    merge_cfg = run.read_section("merge", MergeConfig)  # shared by DAPT and SFT runs; typed, so a typo errs
    trained = trained_base(run)
    if device:
        trained = trained.replace(device=device)
    texts, note = eval_texts, "given texts"
    if texts is None:
        kept = run.read_eval_texts()
        if kept is not None:
            texts, note = kept, f"the run's eval split ({run.eval_texts_path.name})"
    overrides: dict[str, Any] = {k: v for k, v in (("dtype", dtype), ("base_source", base_source)) if v}
    if tolerance is not None:
        overrides["tolerance"] = tolerance
    return merge_adapter(
        trained.name_or_path,
        run.adapter_dir,
        output_dir or merge_cfg.output_dir or run.merged_dir,
        merge_cfg,
        trained_on=trained,
        eval_texts=texts,
        eval_source=note,
        overwrite=overwrite,
        **overrides,
    )
