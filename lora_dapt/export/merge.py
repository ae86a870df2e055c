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
* The dtype is measured, not guessed (``MergeConfig.dtype = 'auto'``, the default): rounding ``W + BA`` to
  bfloat16 erases an update smaller than the weights' bf16 spacing (a short run, a low learning rate), so the
  base's own dtype is kept only when the model merged in it reproduces the adapter; else the next wider dtype
  that does (float16 unless a merged weight overflows it, then float32). Every dtype tried is in the report
  with the share of the update its rounding erased (:mod:`.trials`).
* The shipped folder is verified: it is reloaded with plain ``transformers`` (no peft) and its logits and
  held-out perplexity are compared with the adapter on the 16-bit base. A disagreement beyond ``tolerance``
  (logits) or ``ppl_tolerance`` (perplexity) raises :class:`MergeError` and the folder is left at
  ``OUTPUT.partial`` for inspection, never at ``OUTPUT``; an explicit dtype that failed names the one that
  passes.
* The merged folder gets a model card (README.md, :mod:`.card`) and ``merge_report.json``.

:func:`merge_adapter` reads top to bottom: check (before any weights are loaded) -> per dtype tried: evaluate
the adapter (4-bit as trained, 16-bit), merge, measure -> save -> reload and verify -> report and card.

Memory: the 4-bit model (about a quarter of the 16-bit size) is loaded first for the "as trained" numbers and
freed before the 16-bit base is loaded (kept alongside it only for ``base_source="dequantized"``); the merge is
in place and each merged model is freed before the next dtype's base is loaded or the saved copy reloaded, so
the peak is about one copy of the weights in the widest dtype tried. Adapter files are read tensor by tensor,
and ``adapter_model.bin`` pickles are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import MergeConfig, ModelConfig
from ..errors import MergeError, ModelLoadError
from ..model.load import DTYPES, ModelSource
from ..rundir import MERGE_REPORT, RunDir, write_json_atomic
from .card import RunFacts, merged_card, source_name, write_card
from .job import MergeJob, check_settings, held_out_sequences, merge_settings, prepare_job, trained_settings
from .measure import max_abs_diff, score
from .report import LossResult, MergeReport, compare_bases, dtype_reason
from .trials import Saved, release, try_dtypes

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
class _Verification:
    """The reloaded merged model (c) against the adapter on the 16-bit base (b)."""

    loss: LossResult
    max_abs_logit_diff: float
    logit_scale: float
    ppl_rel_diff: float
    tied: bool
    """The merged model ties embeddings and head, and the reloaded one does too."""
    passed: bool


# ---------------------------------------------------------------------------------------------------------------
# merge_adapter: 1. settings and checks (.job) -> 2. per dtype tried: score the adapter, merge, measure ->
# 3. save -> 4. verify -> 5. report and card
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
    facts: RunFacts | None = None,
    max_eval_tokens: int = MAX_EVAL_TOKENS,
    max_eval_len: int = MAX_EVAL_LEN,
    compare_tokens: int = COMPARE_TOKENS,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    on_report: Callable[[MergeReport], None] | None = None,
    **overrides: Any,
) -> Path:
    """Merge a LoRA adapter into a 16-bit copy of its base, verify the result, save it; return ``output_dir``.

    Args:
        base: the base model the adapter was trained on: a directory, a ``.gguf`` file, a directory with one
            GGUF file, or a hub id.
        adapter_dir: a peft ``save_pretrained`` directory (``continued_pretrain`` or ``sft`` output).
        output_dir: where the merged model goes; it loads with plain ``AutoModelForCausalLM``.
        config: the merge settings (dtype, base_source, tolerance, ppl_tolerance); default ``MergeConfig()``
            (dtype 'auto': the base's own dtype when it keeps the update, else the next wider one that does).
        trained_on: how the base was loaded in training: the run's :class:`ModelSource` (``loaded.source``,
            ``RunDir.read_run_info()``) or its ``model`` section (a :class:`ModelConfig`). Its quantization,
            compute dtype and double_quant give the "as trained" numbers and ``base_source='dequantized'``;
            its device and trust_remote_code apply to every load; its gguf_file applies to ``base`` unless it
            names another model. None: the QLoRA defaults (``ModelConfig()``: NF4, double quantization).
        eval_texts: held-out texts for the check (the run's eval split when known). None: a few generic
            sentences, which still catch a broken merge but say little about domain quality.
        eval_source: how to describe ``eval_texts`` in the report.
        overwrite: replace an existing, non-empty ``output_dir``.
        facts: the training run, for the model card (``merge_run`` reads it from the run directory); None:
            the card names the base and the merge only.
        max_eval_tokens, max_eval_len: how much held-out text is scored, and the longest sequence.
        compare_tokens: positions whose full logits are compared.
        max_shard_size: safetensors shard size of the merged model.
        on_report: called with the report once it is written, whether the merge passed or not (``merge_run``
            logs it to the run's experiment trackers with it).
        **overrides: fields of ``config`` to replace, e.g. ``dtype="float32", tolerance=0.02``; checked like
            the config (an unknown key is a :class:`ConfigError` naming it).

    Raises:
        ConfigError: a bad setting (every one is listed).
        MergeError: corrupted or mismatched adapter, too little disk space, or a merge that does not verify
            (the unverified folder is left at ``OUTPUT.partial`` with its report; an explicit dtype that
            failed names the dtype that passes, measured).

    Example::

        merge_adapter("models/llama-3-8b", "runs/demo/adapter", "runs/demo/merged")   # dtype 'auto'
    """
    cfg = merge_settings(config, overrides)
    base_name = facts.base_name if facts else None
    if base_name is None and isinstance(trained_on, ModelSource):
        base_name = source_name(trained_on.name_or_path, trained_on.gguf_file)
    trained = trained_settings(base, trained_on)
    check_settings(cfg, trained)
    out = Path(output_dir)
    staging = out.with_name(out.name + ".partial")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(
            f"{out} exists and is not empty; choose another output directory or pass overwrite=True"
        )

    with tempfile.TemporaryDirectory(prefix="lora_dapt_adapter_") as tmp:  # a .bin adapter's safetensors copy
        job = prepare_job(base, Path(adapter_dir), out, cfg, trained, tmp, base_name)
        job.sequences, job.eval_source = held_out_sequences(
            job.tokenizer, eval_texts, eval_source, max_eval_tokens, max_eval_len
        )
        saved = try_dtypes(job, cfg, trained, staging, compare_tokens, max_shard_size)

    verified = _verify(staging, job, saved, cfg, compare_tokens)
    report = _report(job, cfg, trained, saved, verified, out if verified.passed else staging)
    write_json_atomic(staging / MERGE_REPORT, report.to_dict())
    write_card(staging, merged_card(report, facts))
    print(report.summary())
    if on_report is not None:
        on_report(report)
    if not verified.passed:
        raise MergeError(_failure(job, cfg, saved, out, staging))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def _failure(job: MergeJob, cfg: MergeConfig, saved: Saved, out: Path, staging: Path) -> str:
    """The MergeError message: what failed, and the dtype that passes when one was measured."""
    if saved.would_pass:
        t = next(t for t in saved.trials if t.dtype == saved.would_pass)
        fix = (
            f"dtype='{t.dtype}' passes (measured: max |logit diff| {t.max_abs_logit_diff:.3g} <= "
            f"{t.allowed_logit_diff:.3g}, ppl {t.perplexity_merged:.4f} vs adapter {t.perplexity_adapter:.4f}): "
            f"merge again with dtype='{t.dtype}' (CLI: --dtype {t.dtype}) or dtype='auto'"
        )
        job.notes.append(fix)
    elif saved.dtype != "float32" or len(saved.trials) > 1:
        job.notes.append(
            "no wider dtype passes either (see dtype_trials): the merge did not keep the adapter"
        )
    return (
        f"the merged model ({saved.dtype}) does not reproduce the adapter; NOT saved to {out}. Inspect {staging} "
        f"and its {MERGE_REPORT}:\n" + "\n".join(f"  - {p}" for p in job.notes)
    )


# ---------------------------------------------------------------------------------------------------------------
# 4. Verify: reload the saved folder without peft
# ---------------------------------------------------------------------------------------------------------------


def _verify(
    staging: Path, job: MergeJob, saved: Saved, cfg: MergeConfig, compare_tokens: int
) -> _Verification:
    """Reload ``staging`` with plain transformers and compare it with the adapter on the 16-bit base (b).

    It passes when the logits agree within ``tolerance`` x their scale, the held-out perplexities within
    ``ppl_tolerance`` (relative), every weight loads by name, and tied weights came back tied; each failure
    is a note in the report.
    """
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(
        str(staging),
        dtype=DTYPES[saved.dtype],
        output_loading_info=True,
        trust_remote_code=job.trust_remote_code,
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
    release(job.big)

    scores = saved.scores
    diff = max_abs_diff(scores.logits_16bit, logits_c)
    scale = max(1.0, float(scores.logits_16bit.abs().max()))
    ref = scores.reference.perplexity
    rel = abs(loss.perplexity / ref - 1) if ref > 0 else float("inf")
    if missing or unexpected:
        job.notes.append(
            f"reloading the merged model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    tied = saved.tied
    if tied and not reload_tied:
        job.notes.append("the merged model should tie embeddings and head, but the reloaded one does not")
    logits_ok = math.isfinite(diff) and diff <= cfg.tolerance * scale
    if not logits_ok:
        job.notes.append(
            f"merged logits ({saved.dtype}) differ from the adapter's by up to {diff:.4g} "
            f"(> {cfg.tolerance:g} x {scale:.3g}; the adapter moves logits by up to {scores.adapter_effect:.3g})"
        )
    if not rel <= cfg.ppl_tolerance:
        job.notes.append(
            f"held-out perplexity of the merged model {loss.perplexity:.4f} differs from the adapter's {ref:.4f} "
            f"by {rel:.2%} (> ppl_tolerance {cfg.ppl_tolerance:g})"
        )
    passed = (
        logits_ok and rel <= cfg.ppl_tolerance and not (missing or unexpected) and (reload_tied or not tied)
    )
    return _Verification(loss, diff, scale, rel, tied and reload_tied, passed)


# ---------------------------------------------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------------------------------------------


def _report(
    job: MergeJob,
    cfg: MergeConfig,
    trained: ModelConfig,
    saved: Saved,
    verified: _Verification,
    output_dir: Path,
) -> MergeReport:
    """Everything measured, as the report written beside the merged model."""
    scores = saved.scores
    quantization = None if trained.quantization == "none" else trained.quantization
    losses = {**scores.losses, "merged": verified.loss}
    closer, lower, advice = compare_bases(losses, cfg.base_source, quantization)
    return MergeReport(
        passed=verified.passed,
        base=job.base,
        base_name=job.base_name,
        resolved_base=str(job.source),
        adapter_dir=str(job.adapter_dir),
        output_dir=str(output_dir),
        dtype=saved.dtype,
        dtype_requested=cfg.dtype,
        dtype_reason=dtype_reason(cfg.dtype, saved.dtype, saved.trials),
        dtype_trials=saved.trials,
        base_source=cfg.base_source,
        trained_quantization=trained.quantization,
        eval_source=job.eval_source,
        eval_texts=len(job.sequences),
        eval_tokens=sum(len(s) - 1 for s in job.sequences),
        losses=losses,
        max_abs_logit_diff=verified.max_abs_logit_diff,
        logit_scale=verified.logit_scale,
        tolerance=cfg.tolerance,
        perplexity_adapter=scores.reference.perplexity,
        perplexity_merged=verified.loss.perplexity,
        ppl_rel_diff=verified.ppl_rel_diff,
        ppl_tolerance=cfg.ppl_tolerance,
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
    log_to_trackers: bool = False,
) -> Path:
    """Merge the adapter of a training run directory (DAPT or SFT); what ``lora-dapt merge RUN_DIR`` calls.

    Reads the run through :class:`RunDir`: the base as loaded in training (:func:`trained_base`), the ``merge``
    section of ``config.yaml`` for defaults, ``adapter/`` and the held-out split (``eval_texts.json``, used
    for the check), and what the model card says about the run (:meth:`RunFacts.from_run`). Arguments left as None take the run's settings; the output defaults to the merge
    section's output_dir, else ``RUN_DIR/merged``. ``log_to_trackers``: the report's figures also go to the
    experiment trackers the run recorded (train.report_to; :func:`~lora_dapt.train.trackers.log_merge`), at
    the run's last step, passed or not (``lora-dapt train`` with merge.enabled).

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
    if log_to_trackers:
        from ..train.trackers import log_merge

        overrides["on_report"] = lambda report: log_merge(run, report.to_dict())
    return merge_adapter(
        trained.name_or_path,
        run.adapter_dir,
        output_dir or merge_cfg.output_dir or run.merged_dir,
        merge_cfg,
        trained_on=trained,
        eval_texts=texts,
        eval_source=note,
        overwrite=overwrite,
        facts=RunFacts.from_run(run),
        **overrides,
    )
