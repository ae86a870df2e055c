"""Continued pre-training: the next-token objective over packed domain blocks, on transformers' Trainer.

:func:`continued_pretrain` reads top to bottom: set up the run directory -> evaluate the base -> fit ->
save the adapter and evaluate it -> write the summary and report. The Trainer is extended in
:mod:`lora_dapt.train.trainer` (subclass and callbacks, never patched): a loss that never materialises the
full ``[batch, seq, vocab]`` fp32 logits, optimizer groups, our schedules, ``metrics.jsonl``, non-finite
checks, Ctrl-C / SIGTERM handling. The run directory is :class:`~lora_dapt.rundir.RunDir`'s:

* crash-safe checkpoints: a checkpoint counts only once its completion marker is written (after every file
  of it is on disk), ``resume_from="latest"`` skips incomplete or corrupt ones, and the metrics log is cut
  back to the checkpoint's step so no step appears twice;
* one run at a time per directory (a lock); a fresh start in a directory that holds a run is refused
  unless ``train.overwrite`` (then the previous run's checkpoints, log and adapter are replaced, with a
  warning) or ``train.resume_from`` is set;
* the evaluation before training is kept (``eval_before.json``, with what it scored), so a resumed run
  compares with the base on the same tokens, and periodic evaluation can stop the run when a forgetting
  budget is exceeded;
* a resume under a changed config is checked before anything is written
  (:mod:`lora_dapt.train.resume_config`): what cannot resume is refused naming each key, the rest is
  logged and applied from the current step (a new length rebuilds the schedule);
* a first SIGINT / SIGTERM stops at the next safe point (after the step, with a checkpoint; after the
  evaluation under way), a second at once; :meth:`TrainResult.exit_status` is what the CLI exits with.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..config import EvalConfig, RunConfig, TrainConfig
from ..errors import DataError, TrainingError
from ..model.load import ModelSource
from ..model.vocab import embedding_layers_to_save
from ..rundir import Resume, RunDir
from . import distributed
from .compile import CompileChoice, choose_for_run, compiled_layers, eager
from .evaluation import RunEvaluation, run_general_texts
from .resume_config import (
    ApplyCurrentSchedule,
    check_general_texts,
    check_resume_config,
    log_resume_length,
    pinned_eval_config,
    recorded_before,
)
from .schedule import total_optimizer_steps
from .trackers import Trackers, check_trackers
from .trainer import DAPTTrainer, Evaluator, RunState, _SignalGuard, build_trainer

log = logging.getLogger("lora_dapt")


@dataclass
class TrainResult:
    """What a training run produced; also written to ``RUN_DIR/summary.json``."""

    output_dir: str
    adapter_dir: str
    steps: int
    tokens_trained: int
    final_loss: float | None
    tokens_per_s: float
    wall_time_s: float
    peak_memory_bytes: int
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    forgetting: dict[str, Any] = field(default_factory=dict)
    """Before -> after per split, against the original 16-bit model when it was scored (else the base as
    trained): ``forgetting_reference`` says which."""
    forgetting_as_trained: dict[str, Any] = field(default_factory=dict)
    """The same on the 4-bit base as trained, when ``forgetting`` is against the original ({} otherwise)."""
    forgetting_reference: str = ""
    original_base: dict[str, Any] = field(default_factory=dict)
    """Whether the original 16-bit model was scored, in which dtype, and why (or why not)."""
    budget: dict[str, Any] = field(default_factory=dict)
    """The forgetting budget's record (eval.max_general_ppl_increase): checks, crossing, best step, restore."""
    probes: dict[str, Any] = field(default_factory=dict)
    """Probe accuracy before -> after per split (eval.probes), per base ('original_16bit', 'as_trained')."""
    lm_eval: dict[str, Any] = field(default_factory=dict)
    """lm-evaluation-harness results before / after (eval.lm_eval_tasks), per base."""
    stopped: str | None = None
    """None when the run finished; else why it stopped early ('interrupted', 'forgetting budget ...')."""
    skipped_steps: int = 0
    """Updates skipped for a non-finite loss or gradient (train.on_nonfinite='skip')."""
    signal: str | None = None
    """The signal ('SIGINT', 'SIGTERM') received during the run, if any; it stopped the run, unless it came
    during the evaluation after training (which then finished: the run is complete)."""
    model_flops_per_token: float | None = None
    """Model FLOPs per trained token (:mod:`lora_dapt.train.flops`: forward, backward through the frozen base,
    LoRA, attention within documents, the recompute under gradient checkpointing); ``flops_terms`` splits it."""
    flops_terms: dict[str, float] = field(default_factory=dict)
    achieved_tflops: float | None = None
    """tokens_per_s x model_flops_per_token, in TFLOP/s (evaluations and saves during training included)."""
    peak_tflops: float | None = None
    """The device's measured matmul peak in the compute dtype (None when not cached and too slow to measure)."""
    peak_source: str | None = None
    """Where the peak came from: 'cached: <key>' or 'measured: <key>', or why there is none."""
    mfu: float | None = None
    """Model FLOPs utilisation: achieved_tflops / peak_tflops."""
    compiled: bool = False
    """Whether this session trained with torch.compile'd layers and loss (train.compile)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def exit_status(self) -> int:
        """What ``lora-dapt train`` / ``sft`` exit with: 0 finished, 128 + the signal's number after a signal
        (130 SIGINT, 143 SIGTERM), :data:`EXIT_STOPPED_EARLY` (3) when a rule stopped it early (the forgetting
        budget). Errors exit 2 (the CLI), a NaN stop included (a TrainingError)."""
        if self.signal is not None:
            return 128 + int(signal.Signals[self.signal])
        return EXIT_STOPPED_EARLY if self.stopped is not None else 0


EXIT_STOPPED_EARLY = 3
"""Exit status of a run stopped early by a rule: the forgetting budget (eval.max_general_ppl_increase)."""


def continued_pretrain(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    config: TrainConfig | None = None,
    *,
    eval_config: EvalConfig | None = None,
    run_config: RunConfig | None = None,
    general_texts: list[str] | None = None,
    callbacks: list[Any] | None = None,
    model_source: ModelSource | None = None,
) -> TrainResult:
    """Continue pre-training ``model`` (a PeftModel from :func:`apply_lora`) on ``corpus``.

    Args:
        model: the LoRA-wrapped model.
        tokenizer: its tokenizer (saved beside the adapter).
        corpus: a :class:`~lora_dapt.data.corpus.Corpus` (``.train``/``.eval`` block datasets) or a Dataset of
            blocks with ``input_ids``, ``position_ids`` and ``labels``.
        config: training settings; ``config.output_dir`` becomes the run directory.
        eval_config: what to measure before/after (and every ``eval_every`` steps); None: defaults.
        run_config: the whole run's config, saved as ``config.yaml`` (else one is assembled from the parts).
        general_texts: general-domain texts for the forgetting measurement (default: EvalConfig's sources or
            the built-in sample).
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. your own logging or stopping rules).
        model_source: where the base model came from (``load_base_model(...).source``), recorded in
            ``run_info.json`` for merge and SFT; None: guessed from the model's config.

    Returns:
        A :class:`TrainResult` (also in ``RUN_DIR/summary.json``).

    Example::

        result = continued_pretrain(model, tok, corpus, TrainConfig(output_dir="runs/demo", max_steps=200))
        print(result.after["domain"]["ppl"])
    """
    cfg = config or TrainConfig()
    # run.start locks the directory against a second run; leaving the block (success, error) unlocks it
    trackers = check_trackers(cfg.report_to)  # a missing tracker package fails before anything is written
    with (
        RunDir(cfg.output_dir) as run,
        Trackers(trackers, cfg.run_name, run.tensorboard_dir, distributed.is_main(), run=run) as tracked,
    ):
        return _train(
            run,
            model,
            tokenizer,
            corpus,
            cfg,
            eval_config or EvalConfig(),
            run_config=run_config,
            general_texts=general_texts,
            callbacks=callbacks,
            model_source=model_source,
            trackers=tracked,
        )


def _train(
    run: RunDir,
    model: Any,
    tokenizer: Any,
    corpus: Any,
    cfg: TrainConfig,
    eval_cfg: EvalConfig,
    *,
    run_config: RunConfig | None,
    general_texts: list[str] | None,
    callbacks: list[Any] | None,
    model_source: ModelSource | None,
    trackers: Trackers,
) -> TrainResult:
    """:func:`continued_pretrain` inside its run directory (whose lock ``run.start`` takes)."""
    train_ds, eval_ds = _split(corpus)
    seq_len = _check_inputs(model, train_ds, cfg)
    distributed.check_launcher(cpu=_on_cpu(model))  # FSDP with the model on the CPU is refused
    distributed.init()  # several processes (torchrun / accelerate launch): open the group before run.start
    world = distributed.world_size()
    total_steps = total_optimizer_steps(len(train_ds), cfg, seq_len, world)
    shards = distributed.shard_stats(len(train_ds), cfg.batch_size, world)
    if distributed.is_main():
        glob = distributed.global_batch(cfg.batch_size, cfg.gradient_accumulation_steps, world)
        log.info(
            "global batch %d blocks (%d tokens) per optimizer step = batch_size %d x gradient_accumulation_steps "
            "%d x %d process(es); %d steps; %s",
            glob,
            glob * seq_len,
            cfg.batch_size,
            cfg.gradient_accumulation_steps,
            world,
            total_steps,
            shards.describe(),
        )
    _prepare_model(model)
    source = model_source or ModelSource.of_model(model)
    from ..export.card import record_base_name  # adapter_config.json names the user's source, not a cache

    record_base_name(model, source)

    # -- setup: the run directory (resume, with the config checked against the run's before anything is
    #    written, or a fresh start), its config and run info ------------------------------------
    stored = run_config or _assembled_config(model, source, cfg, eval_cfg)
    resume = run.start(
        cfg.resume_from,
        overwrite=cfg.overwrite,
        before_resume=lambda r: check_resume_config(r, run, cfg, stored, total_steps),
    )
    log_resume_length(resume, total_steps, cfg)
    recorded = recorded_before(run, resume)  # what the 'before' evaluation of a resumed run scored
    eval_cfg = pinned_eval_config(eval_cfg, recorded)
    _save_run_files(run, model, source, cfg, eval_cfg, run_config, corpus)
    trackers.start()  # before the evaluation before training: its rows go to the trackers too
    state = RunState(checkpoint_bytes=_checkpoint_bytes(model))
    run.check_disk_space(state.checkpoint_bytes * 2, "checkpoints and the adapter")
    general = run_general_texts(general_texts, eval_cfg)
    check_general_texts(recorded, general)
    trust = bool(run_config is not None and run_config.model.trust_remote_code)
    evaluation = RunEvaluation(
        model,
        tokenizer,
        eval_ds,
        general,
        eval_cfg,
        run,
        source=source,
        trust_remote_code=trust,
        trackers=trackers,
    )

    # a first SIGINT/SIGTERM stops at the next safe point: after the evaluation, or the step, under way
    with _SignalGuard(state):
        # -- evaluate the base -------------------------------------------------------------------------
        state.phase = "the evaluation before training"
        before = _evaluate_base(evaluation, run, resume)
        if distributed.any_rank(state.signal is not None):  # every rank stops, or none
            # torchrun passes a signal on to every rank as SIGTERM; one it has not reached yet stops as for it
            state.signal = state.signal or "SIGTERM"
            return _stopped_before_training(run, state, resume, before)

        # -- fit ---------------------------------------------------------------------------------------
        state.phase = "training"
        steps_left = total_steps - (resume.step if resume else 0)
        compiled = _compile_choice(model, train_ds, cfg, seq_len, steps_left, source.compute_dtype)
        trainer = build_trainer(
            model,
            train_ds,
            cfg,
            run,
            state,
            total_steps=total_steps,
            compute_dtype=source.compute_dtype,
            evaluate=_evaluator(evaluation, eval_cfg, compiled=compiled.enabled),
            callbacks=[ApplyCurrentSchedule(cfg), *(callbacks or [])],
            tokens_start=resume.tokens if resume else 0,
            trackers=trackers,
            compiled=compiled.enabled,
        )
        with compiled_layers(model) if compiled.enabled else contextlib.nullcontext():
            wall = _fit(trainer, resume, total_steps, cfg, seq_len)
        restored = evaluation.restore_best()  # the budget stopped the run: the best in-budget adapter
        if restored and state.stopped:
            state.stopped = f"{state.stopped}; {restored}"

        # -- save the adapter, evaluate it -------------------------------------------------------------
        state.phase = "the evaluation after training"
        run.check_disk_space(state.checkpoint_bytes, "the adapter")
        if trainer.is_fsdp_enabled:  # sharded weights: the Trainer gathers them, every rank taking part
            trainer.save_model(str(run.adapter_dir))
        elif distributed.is_main():  # DDP keeps every rank's weights equal: rank 0 saves them
            model.save_pretrained(str(run.adapter_dir), save_embedding_layers=embedding_layers_to_save(model))
        if distributed.is_main():
            tokenizer.save_pretrained(str(run.adapter_dir))
        step, tokens = int(trainer.state.global_step), int(trainer.state.num_input_tokens_seen)
        after = {} if state.interrupted else evaluation.after(step, tokens)

    # -- summary and report ----------------------------------------------------------------------------
    result = _result(run, state, step, tokens, tokens - trainer.tokens_start, wall, before, after)
    result.compiled = compiled.enabled
    if tokens > trainer.tokens_start:  # MFU of this session's training (lora_dapt.train.flops)
        from .flops import run_utilisation

        result = replace(
            result, **run_utilisation(model, train_ds, result.tokens_per_s, source.compute_dtype)
        )
    result.budget = evaluation.final_budget(before, after)
    trackers.log_forgetting(result.forgetting, step)
    run.write_summary({**result.to_dict(), "data_stats": _stats_dict(corpus), "shards": shards.to_dict()})
    if distributed.is_main():
        from ..export.card import RunFacts, adapter_card, write_card  # replaces peft's blank card

        stats = _stats_dict(corpus)
        facts = RunFacts.from_training(result, source, model, cfg.learning_rate, seq_len, stats)
        write_card(run.adapter_dir, adapter_card(facts))
        _finish(run, result, interrupted=state.interrupted)
    distributed.barrier()  # the other ranks return once rank 0 has written everything
    return result


# -------------------------------------------------------------------------------------------------------------
# Setup
# -------------------------------------------------------------------------------------------------------------


def _split(corpus: Any) -> tuple[Any, Any]:
    """(train, eval) datasets from a Corpus or a bare Dataset of blocks."""
    if hasattr(corpus, "train"):
        return corpus.train, getattr(corpus, "eval", None)
    return corpus, None


def _on_cpu(model: Any) -> bool:
    return next(model.parameters()).device.type != "cuda"


def _check_inputs(model: Any, train_ds: Any, cfg: TrainConfig) -> int:
    """Refuse what cannot train (no blocks, no LoRA, missing columns, an 8-bit optimizer on the CPU) before
    anything is written; returns the block length."""
    if train_ds is None or len(train_ds) == 0:
        raise DataError(
            "the training set is empty: no blocks to train on. Check data.sources and the cleaning stats."
        )
    if not hasattr(model, "peft_config"):
        raise TrainingError(
            "continued_pretrain expects a LoRA model: call lora_dapt.apply_lora(model, ...) first"
        )
    missing = {"input_ids", "labels"} - set(train_ds.column_names)
    if missing:
        raise DataError(
            f"training blocks lack column(s) {sorted(missing)}; build them with lora_dapt.prepare_corpus"
        )
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit") and _on_cpu(model):
        raise TrainingError(
            f"train.optimizer = {cfg.optimizer!r} needs a CUDA GPU (bitsandbytes 8-bit optimizers); "
            "use 'adamw' on the CPU"
        )
    seq_len = len(train_ds[0]["input_ids"])
    from ..model.load import check_seq_len  # blocks prepared elsewhere meet the model here first

    check_seq_len(getattr(model, "config", None), seq_len, "seq_len (of the training blocks)")
    return seq_len


def _prepare_model(model: Any) -> None:
    from ..model.bnb import keep_4bit_trainable
    from ..model.lora import use_cpu_dropout

    keep_4bit_trainable(model)
    if _on_cpu(model):
        use_cpu_dropout(model)  # same dropout, a faster mask (PyTorch's was ~20% of a CPU step)


def _save_run_files(
    run: RunDir,
    model: Any,
    source: ModelSource,
    cfg: TrainConfig,
    eval_cfg: EvalConfig,
    run_config: RunConfig | None,
    corpus: Any,
) -> None:
    """config.yaml (resolved), run_info.json (the base model), eval_texts.json (held-out documents)."""
    run.write_config(run_config or _assembled_config(model, source, cfg, eval_cfg))
    run.write_run_info(source)
    texts = getattr(corpus, "eval_documents", None)
    if texts:
        run.write_eval_texts(list(texts))


def _assembled_config(
    model: Any, source: ModelSource, cfg: TrainConfig, eval_cfg: EvalConfig
) -> dict[str, Any]:
    """The sections of config.yaml for a run started from Python without a RunConfig: what is known."""
    peft_cfg = model.peft_config["default"]
    targets = peft_cfg.target_modules
    return {
        "model": {
            "name_or_path": source.name_or_path,
            "gguf_file": source.gguf_file,
            "quantization": source.quantization,
        },
        "adapter": {
            "r": peft_cfg.r,
            "alpha": peft_cfg.lora_alpha,
            "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
            "use_rslora": bool(peft_cfg.use_rslora),
            "use_dora": bool(peft_cfg.use_dora),
            "train_embeddings": bool(peft_cfg.modules_to_save),
        },
        # an SFTConfig is a TrainConfig with more keys: keep the ones the train section knows
        "train": {k: v for k, v in cfg.to_dict().items() if k in TrainConfig.__dataclass_fields__},
        "eval": eval_cfg.to_dict(),
    }


def _checkpoint_bytes(model: Any) -> int:
    """Disk space of one checkpoint: fp32 trainable weights and two Adam moments, 20% slack, 16 MiB files."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(trainable * 4 * 3 * 1.2) + (16 << 20)


# -------------------------------------------------------------------------------------------------------------
# Fit
# -------------------------------------------------------------------------------------------------------------


def _evaluate_base(evaluation: RunEvaluation, run: RunDir, resume: Resume | None) -> dict[str, Any]:
    """The 'before' evaluation. Aborted by a second signal in a fresh session, it leaves no metrics log: the
    directory then holds no run, and the same command starts it again."""
    try:
        return evaluation.before(resumed=resume is not None)
    except KeyboardInterrupt:
        if resume is None:
            run.clear_previous_run()
        raise


def _stopped_before_training(
    run: RunDir, state: RunState, resume: Resume | None, before: dict[str, Any]
) -> TrainResult:
    """A signal came during the 'before' evaluation, which finished: stop before training.

    A fresh session drops what it logged (the metrics log, ``eval_before.json``), so the directory holds no
    run (nothing was trained) and the same command starts it again; a resumed session keeps everything (its
    'before' scores included) and resumes from its checkpoint again."""
    state.stopped = f"interrupted by {state.signal} during the evaluation before training"
    if resume is None:
        run.clear_previous_run()
        how = "nothing was trained; run the same command again to start the run"
    else:
        how = (
            f"the checkpoint at step {resume.step} is kept; resume with train.resume_from='latest' "
            "(CLI: lora-dapt train CONFIG.yaml --set train.resume_from=latest)"
        )
    log.warning("%s: stopped before training; %s", state.stopped, how)
    return TrainResult(
        output_dir=str(run.path),
        adapter_dir=str(run.adapter_dir),
        steps=resume.step if resume else 0,
        tokens_trained=resume.tokens if resume else 0,
        final_loss=None,
        tokens_per_s=0.0,
        wall_time_s=0.0,
        peak_memory_bytes=0,
        before=before,
        stopped=state.stopped,
        signal=state.signal,
    )


def _fit(
    trainer: DAPTTrainer,
    resume: Resume | None,
    total_steps: int,
    cfg: TrainConfig,
    seq_len: int,
) -> float:
    """Train (from ``resume`` when given); returns the wall time. Out of memory becomes advice."""
    t0 = time.time()
    try:
        if resume is not None and resume.step >= total_steps:
            # Every step was done (the process died after its last checkpoint): take that checkpoint's
            # weights instead of entering the loop, which would run one step too many.
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(trainer.model, resume.adapter_weights())
            trainer.state.global_step = resume.step
            trainer.state.num_input_tokens_seen = resume.tokens
        else:
            trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume else None)
    except torch.OutOfMemoryError as e:
        raise TrainingError(_oom_advice(cfg, seq_len, e)) from None
    return time.time() - t0


def _compile_choice(
    model: Any, train_ds: Any, cfg: TrainConfig, seq_len: int, steps: int, compute_dtype: str | None
) -> CompileChoice:
    """train.compile for this session's ``steps`` optimizer steps (every rank decides alike; rank 0 logs)."""
    world = distributed.world_size()
    tokens = (
        steps * distributed.global_batch(cfg.batch_size, cfg.gradient_accumulation_steps, world) * seq_len
    )
    choice = choose_for_run(cfg.compile, model, train_ds, tokens, compute_dtype)
    if distributed.is_main():
        log.info(choice.reason)
    return choice


def _evaluator(evaluation: RunEvaluation, eval_cfg: EvalConfig, *, compiled: bool) -> Evaluator | None:
    """The evaluation during training (None when eval is off); eager inside a compiled run, so that it
    compiles nothing of its own."""
    if not eval_cfg.enabled:
        return None
    return eager(evaluation.during) if compiled else evaluation.during


def _oom_advice(cfg: TrainConfig, seq_len: int, err: Exception) -> str:
    return (
        f"CUDA out of memory with seq_len={seq_len}, batch_size={cfg.batch_size}, "
        f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}. Try: train.batch_size=1 with more "
        "gradient_accumulation_steps (same tokens per step), a shorter data.seq_len, "
        "adapter.gradient_checkpointing=true, a lower adapter.r, or quantization 'nf4'. "
        "`lora-dapt plan MODEL --gpu-memory <GB>` picks settings that fit. "
        f"(torch: {str(err).splitlines()[0] if str(err) else 'OutOfMemoryError'})"
    )


# -------------------------------------------------------------------------------------------------------------
# Summary and report
# -------------------------------------------------------------------------------------------------------------


def _result(
    run: RunDir,
    state: RunState,
    step: int,
    tokens: int,
    session_tokens: int,
    wall: float,
    before: dict[str, Any],
    after: dict[str, Any],
) -> TrainResult:
    from ..evaluate.forgetting import compare_before_after
    from ..evaluate.original import ORIGINAL
    from ..planning.memory import peak_memory_bytes

    return TrainResult(
        output_dir=str(run.path),
        adapter_dir=str(run.adapter_dir),
        steps=step,
        tokens_trained=tokens,
        final_loss=state.last_loss,
        tokens_per_s=session_tokens / max(wall, 1e-9),
        wall_time_s=wall,
        peak_memory_bytes=peak_memory_bytes(),
        before=before,
        after=after,
        **compare_before_after(before, after),
        original_base=dict((before.get(ORIGINAL) or {}).get("plan") or {}),
        stopped=state.stopped,
        skipped_steps=state.skipped_steps,
        signal=state.signal,
    )


def _stats_dict(corpus: Any) -> dict[str, Any]:
    stats = getattr(corpus, "stats", None)
    if stats is None:
        return {}
    return stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)


def _finish(run: RunDir, result: TrainResult, *, interrupted: bool) -> None:
    """An interrupted run says how to resume; a finished one gets its report (and says when a signal came
    during its evaluation after training, which it finished)."""
    if result.signal is not None and not interrupted:
        log.warning(
            "%s received during the evaluation after training: finished it; the run is complete (nothing to "
            "resume), exit status %d because of the signal",
            result.signal,
            result.exit_status(),
        )
    if interrupted:
        log.warning(
            "run interrupted at step %d; checkpoint saved. Resume with train.resume_from='latest' "
            "(CLI: lora-dapt train CONFIG.yaml --set train.resume_from=latest)",
            result.steps,
        )
        return
    from ..evaluate.report import write_report

    try:
        write_report(run.path)
    except Exception as e:  # a report problem must not lose a finished run; say so loudly
        log.warning("could not write report.md: %s: %s", type(e).__name__, e)
