"""GPU benchmark: QLoRA NF4 throughput, peak memory and MFU for ~1B / 3B / 8B Llama models (random weights).

Models are built from configs (no download) with Llama-3.2-1B, Llama-3.2-3B and Llama-3-8B sizes, quantized
to NF4 (double quant, bf16 compute), LoRA r=16 on all linear layers, packed blocks of 2048 tokens, batch 2,
gradient checkpointing, lora_dapt's chunked loss, paged 8-bit AdamW. Each size: 2 warm-up steps, then timed
steps; reported: tokens/s, peak ``torch.cuda.max_memory_allocated`` next to ``estimate_memory``, and MFU.

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 4N (forward 2N + input gradients 2N; frozen
base weights get no weight gradients) + 6 N_lora + attention (6 x layers x D x hidden for forward and
backward, causal within each document of length D = seq/4, which is what the packed attention computes) -- plus 2N more for the recomputed forward is NOT counted (it is overhead, not useful
work) -- and the peak is a measured bf16 matmul rate (8192^3 matmuls on this GPU).

Anchor: torchtune's README reports Llama-3.1-8B QLoRA at 7.4 GiB and 2,413 tokens/s on one RTX 4090.

    python benchmarks/bench_gpu.py                # 1B, 3B, 8B; under 8 minutes on one 24 GB+ GPU
    python benchmarks/bench_gpu.py --cpu-check    # the same code path on the CPU at a tiny size
    python benchmarks/bench_gpu.py --ddp --fsdp [--model smollm2]  # 2 GPUs vs 1 (benchmarks/bench_ddp.py)
    python benchmarks/bench_gpu.py --quick --compile  # 1B eager vs torch.compile'd (train.compile=true)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
import warnings

import torch
from _table import print_table

SIZES = {
    "llama-1b": "llama-3.2-1b",
    "llama-3b": "llama-3.2-3b",
    "llama-8b": "llama-3-8b",
}
TINY = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def matmul_peak_flops(device: str, n: int) -> float:
    """Measured bf16 (GPU) / fp32 (CPU) matmul FLOP/s on n x n x n."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 20 if device == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def build_quantized(config: dict, device: str):
    """Random Llama from a config, saved and reloaded through lora_dapt (NF4 on the GPU, NF4 on CPU too)."""
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_dapt.model.load import load_base_model

    cfg = dict(config)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    d = tempfile.mkdtemp(prefix="lora_dapt_gpu_")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # fast random init on the GPU
        m = AutoModelForCausalLM.from_config(hf, dtype=dtype)
    m.save_pretrained(d)
    _save_placeholder_tokenizer(d)
    del m
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model, _ = load_base_model(d, quantization="nf4", device=device)
    return model


def _save_placeholder_tokenizer(d: str) -> None:
    """load_base_model also loads a tokenizer; random-weight models get a one-token placeholder."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(d)


def run_size(
    name: str,
    config: dict,
    device: str,
    seq_len: int,
    batch: int,
    steps: int,
    peak: float,
    *,
    compiled: bool = False,
) -> dict:
    """One size's timed steps; ``compiled``: decoder layers and loss torch.compile'd as train.compile=true."""
    from lora_dapt.config import AdapterConfig
    from lora_dapt.model.lora import apply_lora
    from lora_dapt.model.loss import causal_lm_loss_sum
    from lora_dapt.planning.memory import estimate_memory
    from lora_dapt.planning.shapes import model_shape
    from lora_dapt.train.compile import compiled_layers

    shape = model_shape(config)
    model = build_quantized(config, device)
    model = apply_lora(model, AdapterConfig(r=16, alpha=32, gradient_checkpointing=True))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
        torch.cuda.reset_peak_memory_stats()
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    n_lora = sum(p.numel() for p in params)
    vocab = shape.vocab_size
    # packed blocks: 4 documents per block, position_ids restart at each
    pos = torch.arange(seq_len) % (seq_len // 4)
    pos = pos.expand(batch, seq_len).to(device)
    times = []
    layers = compiled_layers(model) if compiled else contextlib.nullcontext()
    layers.__enter__()
    for step in range(steps + 2):
        ids = torch.randint(0, vocab, (batch, seq_len), device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, n_tok = causal_lm_loss_sum(model, ids, ids.clone(), pos, compiled_head=compiled)
        (loss / n_tok).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t)
    layers.__exit__(None, None, None)
    tok_s = batch * seq_len / (sum(times) / len(times))
    peak_mem = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    est = estimate_memory(
        config,
        "nf4",
        16,
        seq_len,
        batch,
        True,
        "paged_adamw_8bit",
        compute_dtype="bfloat16" if device == "cuda" else "float32",
        device=device,
    )
    n = shape.total_params
    # causal attention within each of the 4 documents of a block (what packed_sdpa_attention computes):
    # half of 12 L D d per token, D = the document length
    attn = 6 * shape.num_layers * (seq_len // 4) * shape.num_heads * shape.head_dim
    flops_per_token = 4 * n + 6 * n_lora + attn
    del model, opt
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "name": f"{name}{' compiled' if compiled else ''}",
        "params": n,
        "tok_s": tok_s,
        "peak": peak_mem,
        "estimate": est.total - est.overhead,
        "mfu": tok_s * flops_per_token / peak,
        "loss": float(loss / n_tok),
    }


def check_packed_attention(device: str) -> float:
    """lora_dapt's per-document SDPA against transformers' masked SDPA on this device (bf16 on CUDA): the
    largest relative difference of the logits and of the gradients. Raises when they disagree."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_dapt.model.attention import PACKED_SDPA, use_packed_sdpa

    cfg = dict(TINY)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        hf = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
        hf._attn_implementation = "sdpa"
        models.append(AutoModelForCausalLM.from_config(hf, dtype=dtype).to(device))
    models[1].load_state_dict(models[0].state_dict())
    assert use_packed_sdpa(models[1]) and models[1].config._attn_implementation == PACKED_SDPA
    ids = torch.randint(0, cfg["vocab_size"], (2, 512), device=device)
    pos = torch.cat([torch.arange(n) for n in (100, 1, 300, 111)]).expand(2, -1).to(device)
    outs, grads = [], []
    for m in models:
        out = m(input_ids=ids, position_ids=pos, use_cache=False).logits
        out.float().square().mean().backward()
        outs.append(out.detach().float())
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
    rel = max(
        ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item(),
        ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item(),
    )
    if rel > (3e-2 if dtype == torch.bfloat16 else 1e-4):
        raise SystemExit(
            f"packed attention disagrees with masked SDPA on {device}: max relative diff {rel:.2e}"
        )
    return rel


def compare_packed_kernels(device: str, *, batch: int = 4, seq: int = 2048, reps: int = 10) -> list[tuple]:
    """The per-document loop vs the varlen kernels (lora_dapt.model.attention.packed_attention) on packed
    blocks of many short documents (Llama-3-8B's attention: 32 query heads, 8 kv heads, head_dim 128):
    forward + backward time per call and the largest |difference| from masked SDPA, per kernel that runs."""
    from lora_dapt.model.attention import _kernel_layout, _packed_spans, packed_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(batch):  # documents of 16-400 tokens, the last one cut to fill the block
        row, left = [], seq
        while left:
            n = min(left, int(torch.randint(16, 400, (1,), generator=g)))
            row.append(n)
            left -= n
        lengths.append(row)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(device)
    spans = _packed_spans(None, pos, batch, seq)
    q = torch.randn(batch, 32, seq, 128, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(batch, 8, seq, 128, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(batch, 8, seq, 128, generator=g).to(device, dtype).requires_grad_()
    doc = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
    doc = doc.to(device)
    t = torch.arange(seq, device=device)
    mask = ((doc[:, :, None] == doc[:, None, :]) & (t[:, None] >= t[None, :]))[:, None]
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        ref = ref.transpose(1, 2).float()
    rows = []
    for kernel in ("loop", "flash_attn", "torch_varlen", "flex"):
        try:
            layout = _kernel_layout(spans, kernel, torch.device(device), seq)
            out = packed_attention(q, k, v, spans, kernel=kernel, layout=layout)
            out.float().sum().backward()  # warm-up (and compile, for flex)
        except Exception as e:  # a kernel not installed / not supported here: say which and why
            rows.append((kernel, "-", f"unavailable: {type(e).__name__}: {str(e)[:60]}"))
            continue
        diff = (out.detach().float() - ref).abs().max().item()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            out = packed_attention(q, k, v, spans, kernel=kernel, layout=layout)
            out.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append((kernel, f"{(time.perf_counter() - start) / reps * 1e3:.2f}", f"{diff:.2e}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-check", action="store_true", help="tiny model on the CPU: checks the setup only")
    ap.add_argument("--quick", action="store_true", help="1B only, 3 timed steps")
    ap.add_argument("--sizes", default="llama-1b,llama-3b,llama-8b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per size (after 2 warm-up steps)")
    ap.add_argument("--kernels", action="store_true", help="only compare the packed-attention kernels")
    ap.add_argument("--ddp", action="store_true", help="2 GPUs, DDP (torchrun) vs 1 GPU: losses and tokens/s")
    ap.add_argument("--fsdp", action="store_true", help="2 GPUs, FSDP-QLoRA (accelerate) vs 1 GPU")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny", help="for --ddp / --fsdp")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="each size eager and then torch.compile'd (train.compile=true; 'auto' is eager on CUDA)",
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.ddp or args.fsdp:  # benchmarks/bench_ddp.py: exits with a message without 2 GPUs
        from bench_ddp import gpu_check

        for strategy in ("ddp", "fsdp"):
            if getattr(args, strategy):
                gpu_check(strategy, args.model, steps=args.steps + 3, seq_len=args.seq_len)
        return
    if args.kernels or args.cpu_check:
        kdev = "cpu" if args.cpu_check else "cuda"
        kw = {"batch": 1, "seq": 512, "reps": 1} if args.cpu_check else {}
        print(f"packed attention kernels on {kdev} (forward + backward; |diff| from masked SDPA):")
        print_table(("kernel", "ms / call", "max abs diff"), compare_packed_kernels(kdev, **kw))
        if args.kernels:
            return
    from lora_dapt.planning.shapes import known_models

    if args.cpu_check:
        device, runs, seq, steps = "cpu", [("tiny-cpu-check", TINY)], min(args.seq_len, 256), 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --cpu-check to check the setup on the CPU")
        device, seq, steps = "cuda", args.seq_len, args.steps
        sizes = ["llama-1b"] if args.quick else args.sizes.split(",")
        steps = 3 if args.quick else steps
        runs = [(s, known_models()[SIZES[s]]) for s in sizes]
    print(
        f"packed attention vs masked SDPA on {device}: max relative difference {check_packed_attention(device):.1e}"
    )
    peak = matmul_peak_flops(device, 8192 if device == "cuda" else 512)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{gpu}: measured matmul peak {peak / 1e12:.2f} TFLOP/s; seq {seq}, batch {args.batch}, NF4, r=16")
    rows = []
    for (name, cfg), compiled in [
        (run, c) for run in runs for c in ((False, True) if args.compile else (False,))
    ]:
        t = time.perf_counter()
        r = run_size(name, cfg, device, seq, args.batch, steps, peak, compiled=compiled)
        rows.append(r)
        print(
            f"  {r['name']}: {r['tok_s']:.0f} tok/s, {time.perf_counter() - t:.0f} s, loss {r['loss']:.2f}",
            flush=True,
        )
    print()
    print_table(
        ("model", "params", "tokens/s", "peak GiB", "estimate GiB", "MFU"),
        (
            (
                r["name"],
                f"{r['params'] / 1e9:.2f}B",
                f"{r['tok_s']:.0f}",
                f"{r['peak'] / 2**30:.2f}",
                f"{r['estimate'] / 2**30:.2f}",
                f"{r['mfu']:.1%}",
            )
            for r in rows
        ),
    )
    print("anchor: torchtune Llama-3.1-8B QLoRA, RTX 4090: 7.4 GiB, 2,413 tokens/s")


if __name__ == "__main__":
    main()
