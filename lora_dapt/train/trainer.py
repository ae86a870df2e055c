"""What lora_dapt adds to transformers' Trainer, by subclassing and callbacks (never by patching it).

* :class:`DAPTTrainer`: the chunked causal-LM loss over trained positions (``model.loss``), optimizer
  parameter groups (a separate learning rate for fully trained embeddings / head), our schedules, and a
  :class:`~lora_dapt.rundir.TrainRow` in ``metrics.jsonl`` for every logged step;
* :class:`LoraDaptCallback`: completion markers on checkpoints and rotation after them (the Trainer's own
  ``save_total_limit`` rotation is off: it would delete the last complete checkpoint before the new one is
  marked), disk-space checks before saving, non-finite
  loss / gradient checks before each optimizer step, periodic evaluation, stopping on a signal;
* :class:`ProgressBarCallback`: training progress with loss and tokens/s (a bar on a terminal only);
* :class:`_SignalGuard`: the first Ctrl-C / SIGTERM asks for a checkpoint and a clean stop.

They share one :class:`RunState` (typed, one per run): what the signal handler, the callbacks and the
trainer tell each other, and what the run reports at the end (why it stopped, updates skipped, last loss).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..config import TrainConfig
from ..errors import TrainingError
from ..model.loss import causal_lm_loss_sum
from ..model.vocab import trains_token_rows
from ..progress import Progress, progress
from ..rundir import RunDir, TrainRow
from .distributed import any_rank, barrier
from .schedule import group_settings, lr_factor
from .trackers import Trackers, tracker_names

log = logging.getLogger("lora_dapt")

Evaluator = Callable[[int, int], "str | None"]
"""``evaluate(step, tokens_trained)`` during training; returns why the run must stop, or None."""

_OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "sgd": "sgd",
}
"""train.optimizer -> the Trainer's ``optim`` name."""


@dataclass
class RunState:
    """The state one training run shares between the trainer, its callbacks and the signal handler."""

    checkpoint_bytes: int
    """Disk space one checkpoint needs (checked before every save)."""
    stopped: str | None = None
    """Why the run stopped early ('interrupted by SIGINT', 'forgetting budget exceeded ...'); None: it did not."""
    signal: str | None = None
    """The name of the signal received (the run checkpoints and stops after the current step)."""
    skipped_steps: int = 0
    """Updates skipped for a non-finite loss or gradient (train.on_nonfinite='skip')."""
    nonfinite_step: int | None = None
    """The step whose loss was not finite; set by the trainer, handled before that step's update."""
    last_loss: float | None = None
    """The last logged training loss."""
    phase: str = "training"
    """What the run is doing ('training', 'the evaluation before training', ...): what a first signal waits
    for (the current step, or the evaluation) before the run stops."""

    @property
    def interrupted(self) -> bool:
        return self.stopped is not None and self.stopped.startswith("interrupted")


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks; no attention_mask on purpose (documents are separated by position_ids)."""
    out = {"input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)}
    out["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    if "position_ids" in rows[0]:
        out["position_ids"] = torch.tensor([r["position_ids"] for r in rows], dtype=torch.long)
    return out


class DAPTTrainer(Trainer):
    """Trainer with lora_dapt's loss, optimizer groups, schedule and metrics log.

    Args (beyond the Trainer's): ``train_config`` (our TrainConfig), ``run`` (where rows are logged),
    ``run_state`` (shared with the callbacks), ``tokens_start`` (tokens trained before this session, for
    tokens/s when resuming), ``compiled`` (train.compile chose on: the loss's head chunks are compiled too).
    """

    def __init__(
        self,
        *args: Any,
        train_config: TrainConfig,
        run: RunDir,
        run_state: RunState,
        tokens_start: int = 0,
        compiled: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.compiled = compiled
        self.train_config = train_config
        self.run = run
        self.run_state = run_state
        self.tokens_start = tokens_start
        self.session_start = time.time()
        # compute_loss below divides by the token count of the whole accumulated batch itself
        self.model_accepts_loss_kwargs = True

    # -- loss ------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        with loss_autocast(model, dtype, inputs["input_ids"].device.type):
            loss_sum, n = causal_lm_loss_sum(
                model,
                inputs["input_ids"],
                inputs["labels"],
                inputs.get("position_ids"),
                compiled_head=self.compiled and model.training,
            )
        world = self.accelerator.num_processes
        if model.training:  # tokens trained by every rank together
            self.state.num_input_tokens_seen += (
                int(self.accelerator.reduce(torch.tensor(n, device=loss_sum.device), "sum"))
                if world > 1
                else n
            )
        denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
        if isinstance(denom, torch.Tensor):
            denom = denom.to(loss_sum.device)
        loss = loss_sum / denom
        if world > 1 and num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens and DDP averages the gradients over the ranks:
            # x world makes the update sum(all ranks' token losses) / all tokens, as on one process (the
            # Trainer's own compute_loss does the same)
            loss = loss * world
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self.run_state.nonfinite_step = self.state.global_step + 1
        return loss

    # -- checkpoints -----------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save, except that a model training new token rows (adapter.new_tokens) saves those
        rows only, as the final adapter does: peft's default ('auto') would add both grown matrices whole to
        every checkpoint. Resuming loads the rows onto the grown base, which rebuilds every other row."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not trains_token_rows(model):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    # -- optimizer and schedule ------------------------------------------------------------------------
    def create_optimizer(self, model=None):  # noqa: D102
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        cfg = self.train_config
        settings = group_settings(cfg)
        lora, emb = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                # fully trained embeddings/head and new token rows (peft trainable tokens): the embedding group
                (emb if "modules_to_save" in name or "trainable_tokens_delta" in name else lora).append(p)
        groups = [{"params": lora, **settings["lora"], "name": "lora"}]
        if emb:
            groups.append({"params": emb, **settings["embeddings"], "name": "embeddings"})
        opt_cls, opt_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        opt_kwargs.pop("lr", None)
        self.optimizer = opt_cls(groups, lr=cfg.learning_rate, **opt_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):  # noqa: D102
        if self.lr_scheduler is None:
            cfg = self.train_config
            warmup = cfg.warmup_steps or round(cfg.warmup_ratio * num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer,
                lambda s: lr_factor(
                    s,
                    num_training_steps,
                    scheduler=cfg.scheduler,
                    warmup_steps=warmup,
                    min_lr_ratio=cfg.min_lr_ratio,
                    decay_ratio=cfg.decay_ratio,
                ),
            )
        return self.lr_scheduler

    # -- metrics ---------------------------------------------------------------------------------------
    def log(self, logs, start_time=None):  # noqa: D102
        if "loss" in logs and "train_runtime" not in logs:
            elapsed = time.time() - self.session_start
            tokens = int(self.state.num_input_tokens_seen)
            row = TrainRow(
                step=self.state.global_step,
                loss=float(logs["loss"]),
                lr=float(logs.get("learning_rate", self.lr_scheduler.get_last_lr()[0])),
                grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                tokens=tokens,
                tokens_per_s=(tokens - self.tokens_start) / max(elapsed, 1e-9),
                elapsed_s=elapsed,
            )
            self.run_state.last_loss = row.loss
            self.run.append_metric(row)
            logs = {**logs, "tokens": row.tokens, "tok/s": round(row.tokens_per_s, 1)}
        super().log(logs, start_time)


class LoraDaptCallback(TrainerCallback):
    """Non-finite checks, periodic evaluation, signals, disk-space checks, completion markers and rotation."""

    def __init__(self, run: RunDir, cfg: TrainConfig, state: RunState, evaluate: Evaluator | None) -> None:
        self.run = run
        self.cfg = cfg
        self.state = state
        self.evaluate = evaluate

    def on_pre_optimizer_step(self, args, st, control, model=None, **kw):
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        bad_grad = False
        if cfg.precision != "fp16":  # fp16's loss scaler skips inf steps by itself
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norms = torch.stack([g.detach().float().norm() for g in grads])
                bad_grad = not bool(torch.isfinite(norms).all())
        if self.state.nonfinite_step is None and not bad_grad:
            return
        step = st.global_step + 1
        what = "loss" if self.state.nonfinite_step is not None else "gradient"
        self.state.nonfinite_step = None
        if cfg.on_nonfinite == "skip":
            log.warning("step %d: non-finite %s, update skipped (train.on_nonfinite='skip')", step, what)
            for p in model.parameters():
                p.grad = None
            self.state.skipped_steps += 1
            return
        good = self.run.find_resume_checkpoint("latest")
        raise TrainingError(
            f"non-finite {what} at step {step}; training stopped. Last good checkpoint: "
            f"{good or 'none (set train.save_every to keep some)'}. Likely causes: learning rate too high "
            f"(train.learning_rate = {cfg.learning_rate:g}), fp16 overflow (use bf16 or fp32), or corrupt "
            "data. Lower the learning rate and resume, or set train.on_nonfinite='skip'."
        )

    def on_step_end(self, args, st, control, **kw):
        every = self.cfg.eval_every
        if self.evaluate is not None and every and st.global_step % every == 0:
            reason = self.evaluate(st.global_step, int(st.num_input_tokens_seen))
            if reason is not None:
                self.state.stopped = reason
                log.warning(reason)
                control.should_training_stop = True
                control.should_save = True
        # every rank stops at the same step, whichever rank the signal reached (a collective under DDP)
        if any_rank(self.state.signal is not None):
            self.state.stopped = f"interrupted by {self.state.signal or 'a signal to another rank'}"
            control.should_training_stop = True
            control.should_save = True
        if control.should_save:
            self.run.check_disk_space(self.state.checkpoint_bytes, "a checkpoint")
        return control

    def on_save(self, args, st, control, **kw):
        # The Trainer has written checkpoint-N; mark it complete, and only then delete old ones: a kill at
        # any moment leaves at least one complete checkpoint. Under DDP every rank has saved its RNG state
        # into it once all reach the barrier; then rank 0 marks and rotates (mark_complete is False elsewhere).
        barrier()
        if self.run.mark_complete(st.global_step, int(st.num_input_tokens_seen)):
            self.run.rotate_checkpoints(st.global_step, keep=self.cfg.save_total_limit)
        return control


class ProgressBarCallback(TrainerCallback):
    """Training progress with loss and tokens/s (replaces the Trainer's dict-printing bar): a bar on a
    terminal, a log line every 10% of the steps (and every minute) elsewhere (:mod:`lora_dapt.progress`)."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def on_train_begin(self, args, st, control, **kw):
        if not st.is_world_process_zero:  # one bar, rank 0's
            return
        self.bar = progress(st.max_steps, "training", unit="step", initial=st.global_step)

    def on_step_end(self, args, st, control, **kw):
        # a step about to be logged advances in on_log, after its loss is posted (a line shows its own loss)
        if self.bar is not None and not control.should_log:
            self.bar.update(st.global_step - self.bar.n)

    def on_log(self, args, st, control, logs=None, **kw):
        if self.bar is None:
            return
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=logs.get("tok/s"))
        self.bar.update(st.global_step - self.bar.n)

    def on_train_end(self, args, st, control, **kw):
        if self.bar is not None:
            self.bar.close()


def build_trainer(
    model: Any,
    train_ds: Any,
    cfg: TrainConfig,
    run: RunDir,
    state: RunState,
    *,
    total_steps: int,
    compute_dtype: str | None,
    evaluate: Evaluator | None,
    callbacks: list[Any] | None = None,
    tokens_start: int = 0,
    trackers: Trackers | None = None,
    compiled: bool = False,
) -> DAPTTrainer:
    """A :class:`DAPTTrainer` for one run: checkpoints in ``run.checkpoints_dir``, our callbacks first (then
    ``callbacks``), our progress bar instead of the Trainer's; ``train.report_to`` / ``run_name`` go to the
    Trainer, whose tracker callbacks ``trackers`` may replace (:meth:`Trackers.trainer_callbacks`); ``compiled``:
    the loss's head chunks run compiled (the layers are compiled by :func:`~lora_dapt.train.compile.compiled_layers`)."""
    use_cpu = next(model.parameters()).device.type != "cuda"
    args = TrainingArguments(
        output_dir=str(run.checkpoints_dir),
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
        save_total_limit=None,  # LoraDaptCallback.on_save rotates, after the completion marker
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=tracker_names(cfg.report_to) or "none",
        run_name=cfg.run_name,
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        use_cpu=use_cpu,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient (and checkpointing needs False)
        disable_tqdm=True,
        save_only_model=False,
        **_precision_flags(model, cfg, compute_dtype),
    )
    trainer = DAPTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collate_blocks,
        callbacks=[LoraDaptCallback(run, cfg, state, evaluate), ProgressBarCallback(), *(callbacks or [])],
        train_config=cfg,
        run=run,
        run_state=state,
        tokens_start=tokens_start,
        compiled=compiled,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    for callback in trackers.trainer_callbacks() if trackers is not None else []:
        trainer.remove_callback(type(callback))  # the Trainer's own one, replaced for the same tracker
        trainer.add_callback(callback)
    return trainer


class RunInterrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the run stopped at once, where it was; ``signum`` is the signal's number (the
    CLI exits with 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalGuard:
    """First SIGINT/SIGTERM asks the run to stop at its next safe point (``state.signal``): after the current
    step (with a checkpoint) while training, after the evaluation while evaluating (``state.phase``). A
    second one raises :class:`RunInterrupted` at once. Only the main thread can install signal handlers;
    elsewhere this does nothing."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.state.signal:
            raise RunInterrupted(signum)
        self.state.signal = name
        phase = self.state.phase
        then = "saving a checkpoint after this step" if phase == "training" else f"finishing {phase}"
        log.warning("%s received: %s, then stopping (again to abort now)", name, then)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def loss_autocast(model: Any, dtype: torch.dtype | None, device_type: str) -> Iterator[None]:
    """Autocast in ``dtype`` around the loss (the decoder and the head): what train.precision bf16 / fp16
    means (None: nothing changes).

    The Trainer's own autocast wraps ``model.forward``, which :func:`causal_lm_loss_sum` does not call. peft
    would still cast every LoRA input to the fp32 weights' dtype and the output back (its check,
    ``torch.is_autocast_enabled()``, sees CUDA's autocast only), so its input casting is off inside: the LoRA
    matmuls then run in the autocast dtype on the fp32 weights, as the base's do."""
    if dtype is None:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast(device_type, dtype=dtype), disable_input_dtype_casting(model):
        yield


def _precision_flags(model: Any, cfg: TrainConfig, compute_dtype: str | None = None) -> dict[str, bool]:
    """The Trainer's bf16/fp16 flags for train.precision; 'auto' follows the model's compute dtype.

    bf16 means autocast: the LoRA weights stay fp32 (the optimizer's copy) and their matmuls run in bf16
    like the base's: on the CPU a SmolLM2 QLoRA step is about 15% faster than with peft's fp32 LoRA path
    (BENCHMARKS.md). fp16 autocast needs CUDA, so a float16 compute dtype on the CPU stays fp32 there."""
    precision = cfg.precision
    on_cuda = next(model.parameters()).device.type == "cuda"
    if precision == "auto":
        dtype = getattr(model, "dtype", torch.float32)
        bf16 = compute_dtype == "bfloat16" or dtype == torch.bfloat16
        fp16 = compute_dtype == "float16" or dtype == torch.float16
        if bf16 and (on_cuda or compute_dtype in (None, "bfloat16")):
            precision = "bf16"  # on the CPU only when the compute dtype itself is bf16 (or unknown)
        elif fp16 and on_cuda:
            precision = "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and not on_cuda:
        raise TrainingError("train.precision = 'fp16' needs a CUDA GPU; use 'fp32' or 'auto' on the CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}
