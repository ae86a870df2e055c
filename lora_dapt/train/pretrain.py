"""Continued pre-training: the next-token objective over packed domain blocks, on transformers' Trainer.

``continued_pretrain`` reads top to bottom: set up the run directory -> evaluate the base -> fit -> evaluate
the adapted model -> save. What lora_dapt adds on top of the Trainer (by subclassing and callbacks, never by
patching it):

* a loss that never materialises the full ``[batch, seq, vocab]`` fp32 logits: hidden states of the trained
  positions only go through the output head, in chunks when the logits would be large; with a frozen head
  the gradient is computed chunk by chunk in the forward pass, so no logits are kept and none recomputed;
* optimizer parameter groups (a separate learning rate for fully trained embeddings / head);
* cosine / linear / constant / warmup-stable-decay schedules with a floor (``min_lr_ratio``);
* ``metrics.jsonl`` with step, loss, lr, tokens trained and tokens/s; periodic held-out evaluation and a
  forgetting budget that stops the run;
* crash-safe checkpoints: a checkpoint counts only once its completion marker is written (after every file
  of it is on disk), ``resume_from="latest"`` skips incomplete or corrupt ones, and the metrics log is cut
  back to the checkpoint's step so no step appears twice;
* Ctrl-C / SIGTERM save a checkpoint and stop cleanly; non-finite losses or gradients stop the run (or skip
  the update) with the step and the likely causes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import EvalConfig, RunConfig, TrainConfig
from ..errors import DataError, TrainingError
from ..evaluate.forgetting import evaluate_splits
from ..model.load import ModelSource
from ..rundir import (
    RunDir,
    check_disk_space,
    checkpoint_dirs,
    find_resume_checkpoint,
)
from .schedule import total_optimizer_steps
from .trainer import (
    _OPTIMIZERS,
    _callbacks,
    _make_trainer_class,
    _precision_flags,
    _SignalGuard,
    collate_blocks,
)

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
    stopped: str | None = None
    """None when the run finished; else why it stopped early ('interrupted', 'forgetting budget ...')."""
    skipped_steps: int = 0
    """Updates skipped for a non-finite loss or gradient (train.on_nonfinite='skip')."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(corpus: Any) -> tuple[Any, Any]:
    """(train, eval) datasets from a Corpus or a bare Dataset of blocks."""
    if hasattr(corpus, "train"):
        return corpus.train, getattr(corpus, "eval", None)
    return corpus, None


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
        corpus: a :class:`~lora_dapt.corpus.Corpus` (``.train``/``.eval`` block datasets) or a Dataset of blocks
            with ``input_ids``, ``position_ids`` and ``labels``.
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
    from transformers import TrainingArguments

    cfg = config or TrainConfig()
    eval_cfg = eval_config or EvalConfig()
    train_ds, eval_ds = _split(corpus)
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
    seq_len = len(train_ds[0]["input_ids"])
    use_cpu = next(model.parameters()).device.type != "cuda"
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit") and use_cpu:
        raise TrainingError(
            f"train.optimizer = {cfg.optimizer!r} needs a CUDA GPU (bitsandbytes 8-bit optimizers); use 'adamw' on the CPU"
        )
    from ..model.bnb import keep_4bit_trainable
    from ..model.lora import use_cpu_dropout

    keep_4bit_trainable(model)
    if use_cpu:
        use_cpu_dropout(model)  # same dropout, a faster mask (PyTorch's was ~20% of a CPU step)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # -- resume or start -------------------------------------------------------------------------------
    resume_ckpt = find_resume_checkpoint(run_dir, cfg.resume_from) if cfg.resume_from else None
    metrics_path = run_dir / "metrics.jsonl"
    resume_state = json.loads((resume_ckpt / "trainer_state.json").read_text()) if resume_ckpt else {}
    if resume_ckpt is not None:
        RunDir(run_dir).truncate_metrics(resume_state["global_step"])
        log.info("resuming from %s (step %d)", resume_ckpt, resume_state["global_step"])
    else:  # a fresh run in an old directory: its log and checkpoints would mix with the new run's
        old = checkpoint_dirs(run_dir)
        if old or metrics_path.exists():
            log.warning(
                "starting a fresh run in %s: replacing the previous run's metrics log and %d checkpoint(s) "
                "(set train.resume_from=latest to continue it instead)",
                run_dir,
                len(old),
            )
        for ckpt in old:
            shutil.rmtree(ckpt, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
    source = model_source or ModelSource.of_model(model)
    _save_run_files(run_dir, model, source, cfg, eval_cfg, run_config, corpus)

    total_steps = total_optimizer_steps(len(train_ds), cfg, seq_len)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state: dict[str, Any] = {"checkpoint_bytes": int(trainable * 4 * 3 * 1.2) + (16 << 20)}
    check_disk_space(run_dir, state["checkpoint_bytes"] * 2, "checkpoints and the adapter")

    # -- evaluate the base -----------------------------------------------------------------------------
    from ..evaluate.forgetting import forgetting_report
    from ..evaluate.forgetting import general_texts as builtin_general_texts
    from ..plan.memory import peak_memory_bytes

    if eval_cfg.general and general_texts is None and eval_cfg.enabled:
        general_texts = builtin_general_texts(eval_cfg.general_sources or None)
    before_path = run_dir / "eval_before.json"
    before: dict[str, Any] = {}
    if eval_cfg.enabled:
        if resume_ckpt is not None and before_path.is_file():
            before = json.loads(before_path.read_text())
        else:
            before = evaluate_splits(
                model, tokenizer, eval_ds, general_texts, eval_cfg, step=0, phase="before", run_dir=run_dir
            )
            RunDir(run_dir).write_eval_before(before)

    # -- fit -------------------------------------------------------------------------------------------
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_steps=total_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm or 0.0,
        optim=_OPTIMIZERS[cfg.optimizer],
        logging_steps=cfg.logging_every,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 1,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        use_cpu=use_cpu,
        disable_tqdm=True,
        save_only_model=False,
        **_precision_flags(model, cfg, source.compute_dtype),
    )
    trainer_cls = _make_trainer_class()
    general_before = (before.get("general") or {}).get("ppl")

    def periodic_eval(step: int) -> bool:
        """Evaluate mid-run; True asks the run to stop (forgetting budget exceeded)."""
        res = evaluate_splits(
            model,
            tokenizer,
            eval_ds,
            general_texts,
            eval_cfg,
            step=step,
            phase="during",
            run_dir=run_dir,
            tokens_trained=int(trainer.state.num_input_tokens_seen),
        )
        budget = eval_cfg.max_general_ppl_increase
        now = (res.get("general") or {}).get("ppl")
        if budget and general_before and now and now > general_before * (1 + budget):
            state["stopped"] = (
                f"forgetting budget exceeded at step {step}: general ppl {general_before:.3f} -> {now:.3f} "
                f"(+{100 * (now / general_before - 1):.1f}% > {100 * budget:.1f}%)"
            )
            log.warning(state["stopped"])
            return True
        return False

    own_callbacks = _callbacks(run_dir, cfg, state, periodic_eval if eval_cfg.enabled else None)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collate_blocks,
        callbacks=own_callbacks + list(callbacks or []),
        lora_cfg=cfg,
        run_dir=run_dir,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    own_callbacks[0].trainer = trainer

    t0 = time.time()
    trainer.session_tokens_start = resume_state.get("num_input_tokens_seen", 0)
    try:
        if resume_state.get("global_step", 0) >= total_steps:
            # Every step was done (the process died after its last checkpoint): take that checkpoint's
            # weights instead of entering the loop, which would run one step too many.
            _load_checkpoint_weights(model, resume_ckpt)
            trainer.state.global_step = resume_state["global_step"]
            trainer.state.num_input_tokens_seen = resume_state.get("num_input_tokens_seen", 0)
        else:
            with _SignalGuard(state):
                trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
    except torch.OutOfMemoryError as e:
        raise TrainingError(_oom_advice(cfg, seq_len, e)) from None
    wall = time.time() - t0

    # -- evaluate the adapted model and save -----------------------------------------------------------
    adapter_dir = run_dir / "adapter"
    check_disk_space(run_dir, state["checkpoint_bytes"], "the adapter")
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    after: dict[str, Any] = {}
    if eval_cfg.enabled and not str(state.get("stopped", "")).startswith("interrupted"):
        after = evaluate_splits(
            model,
            tokenizer,
            eval_ds,
            general_texts,
            eval_cfg,
            step=trainer.state.global_step,
            phase="after",
            run_dir=run_dir,
            tokens_trained=int(trainer.state.num_input_tokens_seen),
        )
    tokens = int(trainer.state.num_input_tokens_seen)
    session_tokens = tokens - trainer.session_tokens_start
    result = TrainResult(
        output_dir=str(run_dir),
        adapter_dir=str(adapter_dir),
        steps=int(trainer.state.global_step),
        tokens_trained=tokens,
        final_loss=trainer.last_loss,
        tokens_per_s=session_tokens / max(wall, 1e-9),
        wall_time_s=wall,
        peak_memory_bytes=peak_memory_bytes(),
        before=before,
        after=after,
        forgetting=forgetting_report(before, after) if before and after else {},
        stopped=state.get("stopped"),
        skipped_steps=state.get("skipped_steps", 0),
    )
    RunDir(run_dir).write_summary({**result.to_dict(), "data_stats": _stats_dict(corpus)})
    if state.get("stopped", "").startswith("interrupted"):
        log.warning(
            "run interrupted at step %d; checkpoint saved. Resume with train.resume_from='latest' "
            "(CLI: lora-dapt train CONFIG.yaml --set train.resume_from=latest)",
            result.steps,
        )
    else:
        try:
            from ..evaluate.report import write_report

            write_report(run_dir)
        except Exception as e:  # a report problem must not lose a finished run; say so loudly
            log.warning("could not write report.md: %s: %s", type(e).__name__, e)
    return result


def _load_checkpoint_weights(model: Any, ckpt: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))


def _stats_dict(corpus: Any) -> dict[str, Any]:
    stats = getattr(corpus, "stats", None)
    if stats is None:
        return {}
    return stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)


def _oom_advice(cfg: TrainConfig, seq_len: int, err: Exception) -> str:
    return (
        f"CUDA out of memory with seq_len={seq_len}, batch_size={cfg.batch_size}, "
        f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}. Try: train.batch_size=1 with more "
        "gradient_accumulation_steps (same tokens per step), a shorter data.seq_len, "
        "adapter.gradient_checkpointing=true, a lower adapter.r, or quantization 'nf4'. "
        "`lora-dapt plan MODEL --gpu-memory <GB>` picks settings that fit. "
        f"(torch: {str(err).splitlines()[0] if str(err) else 'OutOfMemoryError'})"
    )


def _save_run_files(
    run_dir: Path,
    model: Any,
    source: ModelSource,
    cfg: TrainConfig,
    eval_cfg: EvalConfig,
    run_config: RunConfig | None,
    corpus: Any,
) -> None:
    """config.yaml (resolved), run_info.json (base model, adapter), eval_texts.json (held-out text)."""
    run = RunDir(run_dir)
    if run_config is not None:
        run.write_config(run_config)
    else:
        peft_cfg = model.peft_config["default"]
        run.write_config(
            {
                "model": {
                    "name_or_path": source.name_or_path,
                    "gguf_file": source.gguf_file,
                    "quantization": source.quantization,
                },
                "adapter": {
                    "r": peft_cfg.r,
                    "alpha": peft_cfg.lora_alpha,
                    "target_modules": sorted(peft_cfg.target_modules)
                    if isinstance(peft_cfg.target_modules, (set, list))
                    else peft_cfg.target_modules,
                },
                # an SFTConfig is a TrainConfig with more keys: keep the ones the train section knows
                "train": {k: v for k, v in cfg.to_dict().items() if k in TrainConfig.__dataclass_fields__},
                "eval": eval_cfg.to_dict(),
            }
        )
    run.write_run_info(source)
    texts = getattr(corpus, "eval_documents", None)
    if texts:
        run.write_eval_texts(list(texts))


def _version() -> str:
    from .. import __version__

    return __version__
