"""Memory benchmark: QLoRA NF4 vs unquantized LoRA vs full fine-tuning, and the chunked loss at 128K vocabulary.

Every configuration runs in its own child process (peak memory is per process): load, attach LoRA (or not),
one training step (forward, backward, AdamW step), then report the peak -- process RSS on CPU (peak minus
the RSS after imports), ``torch.cuda.max_memory_allocated`` on GPU -- next to ``lora_dapt.planning.memory``'s
estimate and the bytes the loaded weights really hold (``tensor_bytes``).

Part 2: a tiny Llama with a 128,256-token vocabulary (Llama-3's) and 2 x 2048 tokens, embeddings and head
frozen as in LoRA: peak memory of lora_dapt's loss (trained positions only, in chunks; the gradient for the
hidden states made in the forward pass) against the model's own ``model(..., labels=...)`` loss, which holds
[batch, seq, vocab] fp32 logits; plus lora_dapt's loss with a trained head (``train_embeddings``: autograd,
chunks recomputed in the backward pass).

    python benchmarks/bench_memory.py            # SmolLM2-135M, seq 512
    python benchmarks/bench_memory.py --quick    # tiny random model
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def child_train(model_dir: str, mode: str, seq_len: int) -> dict:
    """One training step of ``mode`` ('qlora', 'lora', 'full'); returns measured and estimated bytes."""
    from lora_dapt.config import AdapterConfig
    from lora_dapt.model.load import load_base_model
    from lora_dapt.model.lora import apply_lora
    from lora_dapt.model.loss import causal_lm_loss_sum
    from lora_dapt.planning.memory import estimate_memory, tensor_bytes

    cuda = torch.cuda.is_available()
    base_rss = _rss_now()
    quant = "nf4" if mode == "qlora" else None
    model, _ = load_base_model(model_dir, quantization=quant)
    adapter = AdapterConfig(r=16, gradient_checkpointing=False)
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        real = tensor_bytes(model)
        real = {"weights": 0, "adapter": real["adapter"]}  # all of it is trained
    else:
        model = apply_lora(model, adapter)
        real = tensor_bytes(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    dev = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, seq_len), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss, n = causal_lm_loss_sum(model, ids, ids.clone())
    (loss / n).backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_peak() - base_rss
    est = estimate_memory(
        model_dir,
        quant,
        None if mode == "full" else adapter,
        seq_len=seq_len,
        batch_size=1,
        gradient_checkpointing=False,
        optimizer="adamw",
        compute_dtype="bfloat16" if cuda else "float32",
        device="cuda" if cuda else "cpu",
    )
    return {"peak": peak, "estimate": est.to_dict(), "real": real}


def child_loss(model_dir: str, which: str, seq_len: int, batch: int) -> dict:
    """Forward + backward of one batch with lora_dapt's chunked loss or the model's own loss."""
    from transformers import AutoModelForCausalLM

    from lora_dapt.model.loss import causal_lm_loss_sum, loss_chunk_tokens

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if which != "lora_dapt_trained_head":  # embeddings and head frozen, as under LoRA
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len))
    base_rss = _rss_now()
    if which.startswith("lora_dapt"):
        loss, n = causal_lm_loss_sum(model, ids, ids.clone())
        (loss / n).backward()
    else:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {"peak": _rss_peak() - base_rss, "chunk": loss_chunk_tokens(vocab)}


def _run_child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, check=False
    )
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model instead of SmolLM2-135M")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--loss-seq-len", type=int, default=2048)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        kind, *rest = json.loads(args.child)
        res = child_train(*rest) if kind == "train" else child_loss(*rest)
        print("RESULT " + json.dumps(res))
        return

    from bench_train import smollm2_dir, tiny_dir

    work = Path(tempfile.mkdtemp(prefix="lora_dapt_bench_mem_"))
    smol = smollm2_dir()
    model_dir = tiny_dir(smol, work / "tiny", layers=4) if args.quick else smol
    name = "tiny random Llama" if args.quick else "SmolLM2-135M"
    dev = "CUDA max allocated" if torch.cuda.is_available() else "process peak RSS growth"
    print(
        f"{name}; one step at seq {args.seq_len}, batch 1, LoRA r=16 all-linear, AdamW; {dev}; {os.cpu_count()} CPUs"
    )
    rows = {}
    for mode in ("qlora", "lora", "full"):
        rows[mode] = _run_child(["train", str(model_dir), mode, args.seq_len])
        print(f"  {mode}: peak {rows[mode]['peak'] / 2**20:.0f} MiB", flush=True)
    labels = {"qlora": "QLoRA NF4", "lora": "LoRA, unquantized base", "full": "full fine-tuning"}
    header = (
        "method",
        "peak MiB",
        "vs full",
        "estimate MiB",
        "est. weights+adapter MiB",
        "real weights+adapter MiB",
        "error",
    )
    table = []
    for mode, r in rows.items():
        e = r["estimate"]
        est_wa = e["weights"] + e["adapter"]
        real_wa = r["real"]["weights"] + r["real"]["adapter"]
        table.append(
            (
                labels[mode],
                f"{r['peak'] / 2**20:.0f}",
                f"{r['peak'] / rows['full']['peak']:.2f}",
                f"{e['total'] / 2**20:.0f}",
                f"{est_wa / 2**20:.1f}",
                f"{real_wa / 2**20:.1f}",
                f"{est_wa / real_wa - 1:+.1%}",
            )
        )
    print()
    print_table(header, table)

    # -- part 2: 128K vocabulary ------------------------------------------------------------------------
    big = tiny_dir(smol, work / "vocab128k", vocab_size=128256)
    loss_rows = {}
    kinds = ("lora_dapt", "lora_dapt_trained_head", "model_labels")
    for which in kinds + kinds:  # alternate, keep the lower
        r = _run_child(["loss", str(big), which, args.loss_seq_len, 2])
        loss_rows[which] = min(loss_rows.get(which, r["peak"]), r["peak"])
    logits_mib = 2 * args.loss_seq_len * 128256 * 4 / 2**20
    print(
        f"\ntiny Llama (hidden 64) with a 128,256-token vocabulary, 2 x {args.loss_seq_len} tokens, forward + "
        f"backward, fp32; [B,T,V] fp32 logits alone = {logits_mib:.0f} MiB"
    )
    print_table(
        ("loss", "peak RSS growth MiB", "ratio"),
        (
            (label, f"{loss_rows[which] / 2**20:.0f}", f"{loss_rows[which] / loss_rows['model_labels']:.2f}")
            for which, label in (
                ("lora_dapt", "lora_dapt, frozen head (LoRA): gradient made in the forward pass, chunked"),
                ("lora_dapt_trained_head", "lora_dapt, trained head: autograd, chunks recomputed"),
                ("model_labels", "model(..., labels=...) (full logits)"),
            )
        ),
    )


if __name__ == "__main__":
    main()
