"""``lora-dapt plan``: its arguments, and the plan printed as text or JSON."""

from __future__ import annotations

import argparse
import json

from .memory import GiB, Plan, plan
from .shapes import known_models


def format_plan(p: Plan) -> str:
    """The plan as text: the verdict, the settings, the memory breakdown and the reasons.

    Example::

        print(format_plan(plan("llama-3-8b", "24GB")))
    """
    head = (
        f"{p.model}: fits in {p.gpu_memory / GiB:.1f} GiB"
        if p.fits
        else f"{p.model}: does NOT fit in {p.gpu_memory / GiB:.1f} GiB"
    )
    if p.gpus > 1:
        head += f" per GPU on {p.gpus} GPUs ({p.strategy.upper()})"
    lines = [head, ""]
    if p.fits:
        lines += [
            f"  quantization           {p.quantization}",
            f"  LoRA rank              {p.rank}",
            f"  seq_len                {p.seq_len}",
            f"  micro-batch            {p.micro_batch_size}",
            f"  gradient accumulation  {p.gradient_accumulation_steps}",
            f"  gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}",
            f"  optimizer              {p.optimizer}",
            "",
        ]
    lines.append("estimated peak (" + ("chosen settings" if p.fits else "smallest settings tried") + "):")
    lines += ["  " + line for line in p.estimate.table().splitlines()]
    lines += ["", "why:"] + [f"  - {n}" for n in p.notes]
    if p.fits:
        lines += ["", "as overrides: " + " ".join(f"--set {o}" for o in p.config_overrides())]
        if p.gpus > 1 and p.strategy == "ddp":
            lines.append(f"launch: lora-dapt train CONFIG --nproc {p.gpus} --set ...")
        elif p.gpus > 1:
            lines.append(
                "launch: accelerate launch --config_file examples/fsdp_qlora_accelerate.yaml --num_processes "
                f"{p.gpus} -m lora_dapt.cli train CONFIG --set model.quant_storage=bfloat16 --set ..."
            )
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``lora-dapt plan``'s arguments to ``parser`` (the CLI's subparser)."""
    parser.add_argument(
        "model",
        help=f"model directory (config.json or .gguf), or a known name: {', '.join(sorted(known_models()))}",
    )
    parser.add_argument("--gpu-memory", required=True, help="memory of the GPU, e.g. 12GB, 24GiB, 8000MiB")
    parser.add_argument("--seq-len", type=int, default=None, help="fix the sequence length (default: choose)")
    parser.add_argument(
        "--quantization",
        default="nf4",
        choices=["nf4", "fp4", "int8", "none"],
        help="base weights (default nf4)",
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank to keep if it fits (default 16)")
    parser.add_argument(
        "--tokens-per-step", type=int, default=32768, help="tokens per optimizer step; sets accumulation"
    )
    parser.add_argument("--gpus", type=int, default=1, help="GPUs, one process each; memory is per GPU")
    parser.add_argument(
        "--strategy",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="with --gpus > 1: ddp (whole model on each GPU, `train --nproc`) or fsdp (sharded base)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def plan_command(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run ``lora-dapt plan``: parse (or take) the arguments, print the plan; exit status 0 when it fits.

    Example::

        plan_command(["llama-3-8b", "--gpu-memory", "12GB"])
    """
    if not isinstance(args, argparse.Namespace):
        args = add_plan_arguments(argparse.ArgumentParser(prog="lora-dapt plan")).parse_args(args)
    quant = None if args.quantization == "none" else args.quantization
    p = plan(
        args.model,
        args.gpu_memory,
        args.seq_len,
        quantization=quant,
        rank=args.rank,
        tokens_per_step=args.tokens_per_step,
        gpus=getattr(args, "gpus", 1),
        strategy=getattr(args, "strategy", "ddp"),
    )
    print(json.dumps(p.to_dict(), indent=2) if getattr(args, "json", False) else format_plan(p))
    return 0 if p.fits else 1
