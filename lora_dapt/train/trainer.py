"""train.trainer (split from train)."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import TrainingError
from ..model.loss import causal_lm_loss_sum
from ..rundir import RunDir, check_disk_space, find_resume_checkpoint
from .schedule import lr_factor

log = logging.getLogger("lora_dapt")


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks; no attention_mask on purpose (documents are separated by position_ids)."""
    out = {"input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)}
    out["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    if "position_ids" in rows[0]:
        out["position_ids"] = torch.tensor([r["position_ids"] for r in rows], dtype=torch.long)
    return out


def _make_trainer_class() -> type:
    from transformers import Trainer

    class DAPTTrainer(Trainer):
        """Trainer with lora_dapt's loss, optimizer groups, schedule, metrics and non-finite checks."""

        def __init__(self, *args: Any, lora_cfg: TrainConfig, run_dir: Path, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.lora_cfg = lora_cfg
            self.run_dir = run_dir
            # compute_loss below divides by the token count of the whole accumulated batch itself
            self.model_accepts_loss_kwargs = True
            self.nonfinite_step: int | None = None
            self.session_start = time.time()
            self.session_tokens_start = 0
            self.last_loss: float | None = None

        # -- loss --------------------------------------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
            labels = inputs["labels"]
            loss_sum, n = causal_lm_loss_sum(model, inputs["input_ids"], labels, inputs.get("position_ids"))
            if model.training:
                self.state.num_input_tokens_seen += n
            denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
            if isinstance(denom, torch.Tensor):
                denom = denom.to(loss_sum.device)
            loss = loss_sum / denom
            return (loss, None) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                self.nonfinite_step = self.state.global_step + 1
            return loss

        # -- optimizer and schedule --------------------------------------------------------------------
        def create_optimizer(self, model=None):  # noqa: D102
            if self.optimizer is not None:
                return self.optimizer
            model = model or self.model
            cfg = self.lora_cfg
            emb_lr = cfg.embedding_learning_rate or cfg.learning_rate / 10
            lora, emb = [], []
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                (emb if "modules_to_save" in name else lora).append(p)
            groups = [
                {"params": lora, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "name": "lora"}
            ]
            if emb:
                groups.append({"params": emb, "lr": emb_lr, "weight_decay": 0.0, "name": "embeddings"})
            opt_cls, opt_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            opt_kwargs.pop("lr", None)
            self.optimizer = opt_cls(groups, lr=cfg.learning_rate, **opt_kwargs)
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):  # noqa: D102
            if self.lr_scheduler is None:
                cfg = self.lora_cfg
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

        # -- metrics -----------------------------------------------------------------------------------
        def log(self, logs, start_time=None):  # noqa: D102
            if "loss" in logs and "train_runtime" not in logs:
                elapsed = time.time() - self.session_start
                tokens = self.state.num_input_tokens_seen
                row = {
                    "type": "train",
                    "step": self.state.global_step,
                    "loss": float(logs["loss"]),
                    "lr": float(logs.get("learning_rate", self.lr_scheduler.get_last_lr()[0])),
                    "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                    "tokens": int(tokens),
                    "tokens_per_s": (tokens - self.session_tokens_start) / max(elapsed, 1e-9),
                    "elapsed_s": elapsed,
                }
                self.last_loss = row["loss"]
                RunDir(self.run_dir).append_metric(row)
                logs = {**logs, "tokens": row["tokens"], "tok/s": round(row["tokens_per_s"], 1)}
            super().log(logs, start_time)

    return DAPTTrainer


def _callbacks(
    run_dir: Path, cfg: TrainConfig, state: dict[str, Any], evaluator: Callable[[int], bool] | None
) -> list:
    from transformers import TrainerCallback

    class LoraDaptCallback(TrainerCallback):
        """Completion markers, signals, non-finite checks, periodic evaluation."""

        def __init__(self) -> None:
            self.trainer: Any = None

        def on_pre_optimizer_step(self, args, st, control, **kw):
            trainer = self.trainer
            bad_grad = False
            if cfg.precision != "fp16":  # fp16's loss scaler skips inf steps by itself
                grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
                if grads:
                    norms = torch.stack([g.detach().float().norm() for g in grads])
                    bad_grad = not bool(torch.isfinite(norms).all())
            if trainer.nonfinite_step is not None or bad_grad:
                step = st.global_step + 1
                what = "loss" if trainer.nonfinite_step is not None else "gradient"
                trainer.nonfinite_step = None
                if cfg.on_nonfinite == "skip":
                    log.warning(
                        "step %d: non-finite %s, update skipped (train.on_nonfinite='skip')", step, what
                    )
                    for p in trainer.model.parameters():
                        p.grad = None
                    state["skipped_steps"] = state.get("skipped_steps", 0) + 1
                    return
                good = find_resume_checkpoint(run_dir, "latest")
                raise TrainingError(
                    f"non-finite {what} at step {step}; training stopped. Last good checkpoint: "
                    f"{good or 'none (set train.save_every to keep some)'}. Likely causes: learning rate too high "
                    f"(train.learning_rate = {cfg.learning_rate:g}), fp16 overflow (use bf16 or fp32), or corrupt "
                    "data. Lower the learning rate and resume, or set train.on_nonfinite='skip'."
                )

        def on_step_end(self, args, st, control, **kw):
            if evaluator is not None and cfg.eval_every and st.global_step % cfg.eval_every == 0:
                if evaluator(st.global_step):
                    control.should_training_stop = True
                    control.should_save = True
            if state.get("signal"):
                state["stopped"] = f"interrupted by {state['signal']}"
                control.should_training_stop = True
                control.should_save = True
            if control.should_save:
                check_disk_space(run_dir, state["checkpoint_bytes"], "a checkpoint")
            return control

        def on_save(self, args, st, control, **kw):
            RunDir(run_dir).mark_complete(st.global_step, int(st.num_input_tokens_seen))
            return control

    class ProgressCallback(TrainerCallback):
        """One tqdm bar with loss and tokens/s (replaces the Trainer's dict-printing bar)."""

        def __init__(self) -> None:
            self.bar: Any = None

        def on_train_begin(self, args, st, control, **kw):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=st.max_steps, initial=st.global_step, desc="training", unit="step", dynamic_ncols=True
            )

        def on_step_end(self, args, st, control, **kw):
            if self.bar is not None:
                self.bar.update(st.global_step - self.bar.n)

        def on_log(self, args, st, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=logs.get("tok/s"))

        def on_train_end(self, args, st, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return [LoraDaptCallback(), ProgressCallback()]


class _SignalGuard:
    """First SIGINT/SIGTERM asks the run to checkpoint and stop; a second one interrupts at once."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.state.get("signal"):
            raise KeyboardInterrupt
        self.state["signal"] = name
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping (again to abort now)", name
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _precision_flags(model: Any, cfg: TrainConfig, compute_dtype: str | None = None) -> dict[str, bool]:
    precision = cfg.precision
    on_cuda = next(model.parameters()).device.type == "cuda"
    if precision == "auto":
        dtype = getattr(model, "dtype", torch.float32)
        compute = compute_dtype
        if not on_cuda:
            precision = "fp32"
        elif compute == "bfloat16" or dtype == torch.bfloat16:
            precision = "bf16"
        elif compute == "float16" or dtype == torch.float16:
            precision = "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and not on_cuda:
        raise TrainingError("train.precision = 'fp16' needs a CUDA GPU; use 'fp32' or 'auto' on the CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


_OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "sgd": "sgd",
}
