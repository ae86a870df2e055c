"""Where a QLoRA training step's time goes: one SmolLM2-135M step (seq 512) split into NF4 dequantization, base
matmuls, LoRA, attention, the loss, the optimizer and the rest, with torch.profiler on the CPU.

The step is what lora_dapt's Trainer runs (``causal_lm_loss_sum`` forward and backward on packed blocks of
the standard library's sources, gradient clipping, AdamW), with the library's defaults: NF4, compute dtype
auto (bf16 autocast around the loss when it is bf16, as ``train.precision: auto``), LoRA r=16 on all
linear layers without dropout, batch 4, checkpointing as ``adapter.gradient_checkpointing: auto``
chooses (``--checkpointing on|off`` forces it), and the decoder layers and the loss torch.compile'd as
``train.compile: auto`` does for a run of more than a few minutes (``--compile off``: eager). Every profiled op's SELF time goes to one group:

* NF4 dequantization: bitsandbytes' ``dequantize_4bit`` / ``dequantize_blockwise`` and the ops under them;
* attention: SDPA forward and backward (and the varlen/flex kernels on CUDA);
* loss: ops on a ``vocab``-wide operand or under the frozen head's loss (the head's matmuls, log-softmax
  and its gradient, compiled or not);
* LoRA: matmuls with a rank-``r`` operand (A and B, forward and backward);
* base matmuls: every other matmul (the frozen 4-bit layers, forward, recompute and input gradients);
* optimizer: everything under ``optimizer`` (clipping, AdamW, zeroing the gradients);
* other: norms, rotary embeddings, activations, dropout masks, copies and casts (compiled: the fused
  kernels of the layers' graphs).

Next to the measured time, each group's model FLOPs (``lora_dapt.train.flops``) give its rate.

    python benchmarks/profile_step.py                      # 2 warm-up steps, 3 profiled; under a minute
    python benchmarks/profile_step.py --checkpointing on   # the recompute's cost
    python benchmarks/profile_step.py --top 6              # and the 6 costliest ops of each group
    python benchmarks/profile_step.py --compile off        # eager, as a short run
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402
from bench_train import stdlib_texts  # noqa: E402

GROUPS = ("NF4 dequantization", "base matmuls", "LoRA", "attention", "loss", "optimizer", "other")
MATMULS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::matmul",
    "aten::linear",
    "aten::_weight_int4pack_mm",
)


def _dims(event) -> set[int]:
    return {d for shape in (event.input_shapes or []) for d in shape}


def classify(event, rank: int, vocab: int) -> str:
    """The group of one profiled op (see the module docstring), from its name, its shapes and its parents."""
    chain = []
    e = event
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    if "optimizer" in chain:
        return "optimizer"
    if any("dequantize" in n for n in chain):
        return "NF4 dequantization"
    if any("scaled_dot_product" in n.lower() or "flash_attention" in n.lower() or "flex" in n for n in chain):
        return "attention"
    dims = _dims(event)
    if vocab in dims or "_FrozenHeadCrossEntropy" in chain:  # the head's ops, compiled ones included
        return "loss"
    if event.name in MATMULS:
        return "LoRA" if rank in dims else "base matmuls"
    return "other"


def packed_batches(tok, seq_len: int, batch: int, n: int):
    """``n`` batches of packed blocks of the standard library's sources (lora_dapt's packing)."""
    from lora_dapt.config import DataConfig
    from lora_dapt.data.corpus import prepare_corpus
    from lora_dapt.train.trainer import collate_blocks

    corpus = prepare_corpus(
        [stdlib_texts(seq_len * batch * n * 6)],
        tok,
        DataConfig(seq_len=seq_len, eval_fraction=0.0),
        use_cache=False,
    )
    rows = [corpus.train[i] for i in range(batch * n)]
    return [collate_blocks(rows[i * batch : (i + 1) * batch]) for i in range(n)], corpus.train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=None, help="blocks per step (default: train.batch_size's)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--compile", choices=["on", "off"], default="on", help="as train.compile chooses")
    ap.add_argument(
        "--top", type=int, default=0, help="also list the N ops with the most self time in each group"
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    from torch.profiler import ProfilerActivity, profile, record_function

    from lora_dapt.cli.quickstart import smollm2_gguf
    from lora_dapt.config import AdapterConfig, TrainConfig
    from lora_dapt.model.load import load_base_model
    from lora_dapt.model.lora import apply_lora, use_cpu_dropout
    from lora_dapt.model.loss import causal_lm_loss_sum
    from lora_dapt.train.compile import compiled_layers
    from lora_dapt.train.flops import matmul_peak, model_flops_per_token
    from lora_dapt.train.trainer import loss_autocast

    batch = args.batch or TrainConfig().batch_size
    directory, gguf = smollm2_gguf()
    model, tok = load_base_model(directory, gguf_file=gguf)
    ckpt = {"auto": "auto", "on": True, "off": False}[args.checkpointing]
    adapter = AdapterConfig(gradient_checkpointing=ckpt)
    model = apply_lora(model, adapter, seq_len=args.seq_len, batch_size=batch)
    use_cpu_dropout(model)  # what continued_pretrain does on the CPU
    model.train()
    base = model.get_base_model()
    checkpointing = bool(base.is_gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    batches, train = packed_batches(tok, args.seq_len, batch, 2 + args.steps)
    compute = base.model.layers[0].self_attn.q_proj.base_layer.compute_dtype
    vocab = int(base.config.vocab_size)

    def step(inputs) -> None:
        # train.precision auto: bf16 autocast when the compute dtype is bf16, as the Trainer's compute_loss
        with loss_autocast(model, torch.bfloat16 if compute == torch.bfloat16 else None, "cpu"):
            loss, n = causal_lm_loss_sum(
                model, inputs["input_ids"], inputs["labels"], inputs["position_ids"], compiled_head=compiled
            )
        (loss / n).backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    compiled = args.compile == "on"
    layers = compiled_layers(model) if compiled else contextlib.nullcontext()
    layers.__enter__()  # for the rest of the process (kept referenced: collected, it would undo the compile)
    for inputs in batches[:2]:
        step(inputs)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for inputs in batches[2:]:
            step(inputs)
        wall = (time.perf_counter() - t) / args.steps
    totals: dict[str, float] = collections.defaultdict(float)
    by_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    for event in prof.events():
        group = classify(event, adapter.r, vocab)
        totals[group] += event.self_cpu_time_total / 1e3 / args.steps  # ms a step
        by_op[(group, event.name)] += event.self_cpu_time_total / 1e3 / args.steps
    profiled = sum(totals.values())

    flops = model_flops_per_token(model, train)
    tokens = int(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches[2:]) / args.steps)
    peak = matmul_peak("cpu", compute, measure=True)
    achieved = flops.total * tokens / wall
    print(
        f"SmolLM2-135M QLoRA NF4 ({str(compute).removeprefix('torch.')} compute), seq {args.seq_len}, batch {batch}, "
        f"r={adapter.r}, checkpointing {'on' if checkpointing else 'off'} ({args.checkpointing}), compile {args.compile}; "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"step {wall * 1e3:.0f} ms wall ({profiled:.0f} ms profiled self time), {tokens / wall:.0f} trained tokens/s, "
        f"{flops.total / 1e9:.3f} GFLOP per trained token: {achieved / 1e12:.3f} TFLOP/s = MFU {achieved / peak.flops_per_s:.1%} "
        f"of the {peak.flops_per_s / 1e12:.2f} TFLOP/s {peak.dtype} peak ({peak.source})"
    )
    print()
    print_table(
        ("group", "ms / step", "% of step"),
        ((g, f"{totals.get(g, 0.0):.1f}", f"{totals.get(g, 0.0) / profiled:.1%}") for g in GROUPS),
    )
    if args.top:
        top = sorted(by_op.items(), key=lambda kv: -kv[1])
        rows = [(g, op, f"{ms:.1f}") for g in GROUPS for (gg, op), ms in top if gg == g]
        per_group = [r for g in GROUPS for r in [x for x in rows if x[0] == g][: args.top]]
        print()
        print_table(("group", "op", "ms / step"), per_group)


if __name__ == "__main__":
    main()
