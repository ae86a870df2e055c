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
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

from .config import EvalConfig, RunConfig, TrainConfig
from .errors import DataError, TrainingError

log = logging.getLogger("lora_dapt")

COMPLETE_MARKER = "lora_dapt_complete.json"
LOSS_CHUNK_TOKENS = 1024
"""The most positions per chunk when the loss is chunked."""
LOSS_LOGITS_BUDGET = 256 * 2**20
"""Bytes of fp32 logits the loss may hold at once; above it, chunks are recomputed in the backward pass."""


def loss_chunk_tokens(vocab_size: int) -> int:
    """Positions per loss chunk: at most LOSS_CHUNK_TOKENS, and few enough that a chunk's fp32 logits stay
    within a quarter of LOSS_LOGITS_BUDGET (a 128K vocabulary gets 128-token chunks)."""
    return max(16, min(LOSS_CHUNK_TOKENS, LOSS_LOGITS_BUDGET // 4 // (4 * vocab_size)))


def loss_chunk_size(positions: int, vocab_size: int) -> int:
    """Positions the loss takes at once: all of them while their fp32 logits fit LOSS_LOGITS_BUDGET, else
    :func:`loss_chunk_tokens`."""
    return positions if positions * vocab_size * 4 <= LOSS_LOGITS_BUDGET else loss_chunk_tokens(vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Schedules (pure)
# ---------------------------------------------------------------------------------------------------------------


def lr_factor(
    step: int,
    total_steps: int,
    *,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_ratio: float = 0.2,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly to the peak and reaches it at step ``warmup_steps`` (the first step already gets
    ``1/(warmup_steps+1)``, not zero). After warmup: cosine or linear decay to ``min_lr_ratio``; 'constant';
    or 'wsd' (warmup-stable-decay): flat, then a linear decay over the last ``decay_ratio`` of the steps.

    >>> [round(lr_factor(s, 10, scheduler="linear", warmup_steps=2, min_lr_ratio=0.0), 3) for s in (0, 2, 6, 10)]
    [0.333, 1.0, 0.5, 0.0]
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if scheduler == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if scheduler == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    if scheduler == "wsd":
        decay_steps = max(1, round(decay_ratio * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        frac = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - frac)
    raise ValueError(f"unknown scheduler {scheduler!r}")


def total_optimizer_steps(num_blocks: int, cfg: TrainConfig, seq_len: int) -> int:
    """Optimizer steps from max_steps, else epochs, else max_tokens, else one epoch."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * num_blocks / per_step))
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / (per_step * seq_len)))
    return max(1, math.ceil(num_blocks / per_step))


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------


def _supports_hidden_state_loss(base: Any) -> bool:
    cfg = getattr(base, "config", None)
    if cfg is None or not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return False
    # Heads that post-process logits (soft-capping, scaling) go through the model's own forward instead.
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return True


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, for a frozen output head.

    The gradient w.r.t. ``hidden`` is computed in the forward pass, ``chunk`` positions at a time
    (``softmax - one_hot`` times the head weight), and kept; the logits of a chunk are freed before the next
    one. Autograd would instead keep every chunk's logits (or, chunked with recomputation, run the head
    twice). Backward only scales the stored gradient. The head's weight and bias get no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # noqa: D102
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if need_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.shape[0], chunk):
            y = targets[i : i + chunk]
            logp = torch.log_softmax(F.linear(hidden[i : i + chunk], weight, bias).float(), dim=-1)
            total -= logp.gather(1, y[:, None]).sum()
            if need_grad:
                logp.exp_()  # softmax, in place
                logp[torch.arange(len(y), device=y.device), y] -= 1
                grad[i : i + chunk] = logp.to(weight.dtype) @ weight
            del logp
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def _frozen_linear_head(head: Any) -> bool:
    """A plain ``nn.Linear`` output head with no trainable tensor (not LoRA-wrapped, quantized or trained)."""
    return (
        type(head) is torch.nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    )


def causal_lm_loss_sum(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose target label is not -100, and their count.

    Only hidden states of trained positions reach the output head (padding and masked prompts cost nothing
    there). When their fp32 logits fit in ``LOSS_LOGITS_BUDGET`` they are computed in one go; otherwise in
    chunks of :func:`loss_chunk_tokens` positions, so peak memory holds one chunk of logits instead of
    [batch, seq, vocab]. A frozen head (the LoRA case) gets the gradient w.r.t. the hidden states in the
    forward pass, chunk by chunk, and keeps no logits at all; a trainable or wrapped head keeps autograd's
    own path, with each chunk recomputed in the backward pass (a second pass through the head, which is why
    small batches skip chunking). Heads that post-process logits (soft-capping, scaling) go through the
    model's own forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = labels[:, 1:]  # logits[t] predicts token t+1
    keep = targets != -100
    n = int(keep.sum())
    if n == 0:
        zero = sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        return zero, 0
    if not _supports_hidden_state_loss(base):
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), n
    # use_cache=False: transformers only derives the packed-document mask from position_ids without a KV cache
    hidden = base.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    h = hidden[:, :-1][keep]  # [n, hidden]
    y = targets[keep]  # [n]
    head = base.get_output_embeddings()

    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h_chunk).float(), y_chunk, reduction="sum")

    vocab = int(getattr(base.config, "vocab_size", 0) or head.weight.shape[0])
    chunk = loss_chunk_size(n, vocab)
    if _frozen_linear_head(head):
        return _FrozenHeadCrossEntropy.apply(h, head.weight, head.bias, y, chunk), n
    if chunk >= n:
        return chunk_loss(h, y), n
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        hc, yc = h[i : i + chunk], y[i : i + chunk]
        total = total + (
            recompute(chunk_loss, hc, yc, use_reentrant=False) if h.requires_grad else chunk_loss(hc, yc)
        )
    return total, n


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks; no attention_mask on purpose (documents are separated by position_ids)."""
    out = {"input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)}
    out["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    if "position_ids" in rows[0]:
        out["position_ids"] = torch.tensor([r["position_ids"] for r in rows], dtype=torch.long)
    return out


def _split(corpus: Any) -> tuple[Any, Any]:
    """(train, eval) datasets from a Corpus or a bare Dataset of blocks."""
    if hasattr(corpus, "train"):
        return corpus.train, getattr(corpus, "eval", None)
    return corpus, None


# ---------------------------------------------------------------------------------------------------------------
# Run directory
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first (complete or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("checkpoint-*"):
        try:
            found.append((int(p.name.rsplit("-", 1)[1]), p))
        except ValueError:
            continue
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete and readable."""
    if not (ckpt / COMPLETE_MARKER).is_file():
        return "no completion marker (the save was interrupted)"
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({e})"
    weights = ckpt / "adapter_model.safetensors"
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            return f"adapter weights corrupt ({type(e).__name__}: {e})"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (ckpt / name).is_file() or (ckpt / name).stat().st_size == 0:
            return f"{name} missing or empty"
    return None


def find_resume_checkpoint(run_dir: Path, resume_from: str) -> Path | None:
    """Resolve ``resume_from`` ('latest' or a path). 'latest' skips incomplete/corrupt checkpoints with a
    warning; None when there is nothing to resume (a fresh start)."""
    if resume_from != "latest":
        p = Path(resume_from)
        problem = checkpoint_problem(p) if p.is_dir() else "not a directory"
        if problem:
            raise TrainingError(
                f"cannot resume from {p}: {problem}. Use resume_from='latest' to pick the newest good one"
            )
        return p
    for ckpt in checkpoint_dirs(run_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop train/eval rows logged after ``step`` (they were written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row cut by a crash
        if row.get("phase") == "before" or int(row.get("step", 0)) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def check_disk_space(path: Path, needed_bytes: int, what: str) -> None:
    """Raise a clear error when the file system of ``path`` has less than ``needed_bytes`` free."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise TrainingError(
            f"not enough disk space for {what} in {path}: {free / 2**20:.0f} MiB free, about "
            f"{needed_bytes / 2**20:.0f} MiB needed. Free some space or point output_dir elsewhere."
        )


# ---------------------------------------------------------------------------------------------------------------
# Trainer subclass and callbacks
# ---------------------------------------------------------------------------------------------------------------


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
                _append_jsonl(self.run_dir / "metrics.jsonl", row)
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
            ckpt = run_dir / "checkpoints" / f"checkpoint-{st.global_step}"
            if ckpt.is_dir():
                _write_json(
                    ckpt / COMPLETE_MARKER, {"step": st.global_step, "tokens": st.num_input_tokens_seen}
                )
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


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def _precision_flags(model: Any, cfg: TrainConfig) -> dict[str, bool]:
    precision = cfg.precision
    on_cuda = next(model.parameters()).device.type == "cuda"
    if precision == "auto":
        dtype = getattr(model, "dtype", torch.float32)
        compute = (getattr(model, "lora_dapt_source", None) or {}).get("compute_dtype")
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
    from .model import keep_4bit_trainable, use_cpu_dropout

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
        _truncate_metrics(metrics_path, resume_state["global_step"])
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
    _save_run_files(run_dir, model, tokenizer, cfg, eval_cfg, run_config, corpus)

    total_steps = total_optimizer_steps(len(train_ds), cfg, seq_len)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state: dict[str, Any] = {"checkpoint_bytes": int(trainable * 4 * 3 * 1.2) + (16 << 20)}
    check_disk_space(run_dir, state["checkpoint_bytes"] * 2, "checkpoints and the adapter")

    # -- evaluate the base -----------------------------------------------------------------------------
    from . import evaluate as ev

    if eval_cfg.general and general_texts is None and eval_cfg.enabled:
        general_texts = ev.general_texts(eval_cfg.general_sources or None)
    before_path = run_dir / "eval_before.json"
    before: dict[str, Any] = {}
    if eval_cfg.enabled:
        if resume_ckpt is not None and before_path.is_file():
            before = json.loads(before_path.read_text())
        else:
            before = _evaluate_all(
                model, tokenizer, eval_ds, general_texts, eval_cfg, step=0, phase="before", run_dir=run_dir
            )
            _write_json(before_path, before)

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
        **_precision_flags(model, cfg),
    )
    trainer_cls = _make_trainer_class()
    general_before = (before.get("general") or {}).get("ppl")

    def periodic_eval(step: int) -> bool:
        """Evaluate mid-run; True asks the run to stop (forgetting budget exceeded)."""
        res = _evaluate_all(
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
        after = _evaluate_all(
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
        peak_memory_bytes=ev.peak_memory_bytes(),
        before=before,
        after=after,
        forgetting=ev.forgetting_report(before, after) if before and after else {},
        stopped=state.get("stopped"),
        skipped_steps=state.get("skipped_steps", 0),
    )
    _write_json(run_dir / "summary.json", {**result.to_dict(), "data_stats": _stats_dict(corpus)})
    if state.get("stopped", "").startswith("interrupted"):
        log.warning(
            "run interrupted at step %d; checkpoint saved. Resume with train.resume_from='latest' "
            "(CLI: lora-dapt train CONFIG.yaml --set train.resume_from=latest)",
            result.steps,
        )
    else:
        try:
            from .report import write_report

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


def _evaluate_all(
    model: Any,
    tokenizer: Any,
    eval_ds: Any,
    general_texts: list[str] | None,
    eval_cfg: EvalConfig,
    *,
    step: int,
    phase: str,
    run_dir: Path,
    tokens_trained: int = 0,
) -> dict[str, Any]:
    """Domain (held-out blocks) and general (texts) evaluation; rows go to metrics.jsonl.

    In a row, ``tokens`` is the number of tokens trained so far (the x axis of the plots) and ``eval_tokens``
    the number of tokens scored.
    """
    from . import evaluate as ev

    out: dict[str, Any] = {}
    if eval_ds is not None and len(eval_ds) > 0:
        seq_len = len(eval_ds[0]["input_ids"])
        max_blocks = None if eval_cfg.max_eval_tokens is None else max(1, eval_cfg.max_eval_tokens // seq_len)
        out["domain"] = ev.evaluate_blocks(
            model,
            eval_ds,
            batch_size=eval_cfg.batch_size,
            max_blocks=max_blocks,
            desc=f"eval domain ({phase})",
        ).to_dict()
    if general_texts:
        out["general"] = ev.evaluate_texts(
            model,
            tokenizer,
            general_texts,
            batch_size=eval_cfg.batch_size,
            max_tokens=eval_cfg.max_eval_tokens,
            desc=f"eval general ({phase})",
        ).to_dict()
    for split, res in out.items():
        _append_jsonl(
            run_dir / "metrics.jsonl",
            {
                "type": "eval",
                "step": step,
                "phase": phase,
                "split": split,
                **res,
                "eval_tokens": res["tokens"],
                "tokens": tokens_trained,
            },
        )
        log.info("%s eval %s: loss %.4f ppl %.3f", phase, split, res["loss"], res["ppl"])
    if eval_cfg.prompts and phase in ("before", "after"):
        out["samples"] = ev.generate_samples(
            model, tokenizer, eval_cfg.prompts, max_new_tokens=eval_cfg.max_new_tokens
        )
    return out


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
    tokenizer: Any,
    cfg: TrainConfig,
    eval_cfg: EvalConfig,
    run_config: RunConfig | None,
    corpus: Any,
) -> None:
    """config.yaml (resolved), run_info.json (base model, adapter), eval_texts.json (held-out text)."""
    source = dict(
        getattr(model.get_base_model(), "lora_dapt_source", None)
        or getattr(model, "lora_dapt_source", {})
        or {}
    )
    if run_config is not None:
        run_config.to_yaml(run_dir / "config.yaml")
    else:
        import yaml

        peft_cfg = model.peft_config["default"]
        data = {
            "model": {k: source.get(k) for k in ("name_or_path", "gguf_file", "quantization")},
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
        (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    _write_json(run_dir / "run_info.json", {"base_model": source, "lora_dapt_version": _version()})
    texts = getattr(corpus, "eval_documents", None)
    if texts:
        _write_json(run_dir / "eval_texts.json", list(texts)[:256])


def _version() -> str:
    from . import __version__

    return __version__
