"""Defaults from evidence: lora_dapt candidates vs a hand-written transformers + peft recipe, same tokens.

For each real corpus (documents nobody here wrote, split into train / held-out BY DOCUMENT with a fixed
seed) every candidate trains SmolLM2-135M-Instruct (QLoRA NF4) on the same training documents for the same
token budget; then each adapter is scored INDEPENDENTLY of lora_dapt's evaluation (plain transformers +
peft, non-overlapping windows of ``--seq-len`` tokens, mean next-token NLL) on the ORIGINAL 16-bit base
(what the merge ships) on:

* held-out domain documents (the corpus's held-out split),
* general English that we did not write: the Debian ``fortunes`` package's literature, people, wisdom,
  love, food, sports, pets, medicine and work files (quotations and short prose; ``apt install fortunes``).

Corpora: ``stdlib`` (the quickstart's: docstrings of Python's standard library, one document per module)
and ``man`` (section-1 manual pages of the installed packages, rendered with ``man``).

Candidates: ``tune`` (``lora-dapt tune`` on the defaults' config, validating on other ``fortunes`` files than
the table's general text, then a run of its chosen config on the same budget), ``recipe`` (the hand-written transformers + peft recipe: r=16, alpha=32, lr 2e-4 cosine with 5%
warmup, batch 4, no accumulation, bf16 compute, ``group_texts``), ``old`` (lora_dapt's defaults before
issue 14: 1 x 8 blocks per step, no warmup, fp32 compute, checkpointing on), ``new`` (lora_dapt's current
defaults: only model, data, seq_len and the token budget set), and variants of ``new`` given as overrides.

    python benchmarks/bench_defaults.py --corpus stdlib --candidates recipe,old,new --budget 40000
    python benchmarks/bench_defaults.py --corpus man --candidates recipe,new --budget 40000

Training tokens/s here are for the record only (runs are sequential, not alternated): the speed comparison
is ``bench_train.py``'s side-by-side measurement.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import logging
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402
from bench_train import smollm2_dir  # noqa: E402

FORTUNE_FILES = ("literature", "people", "wisdom", "love", "food", "sports", "pets", "medicine", "work")
FORTUNES = Path("/usr/share/games/fortunes")
TUNE_GENERAL_FILES = (
    "humorists",
    "politics",
    "science",
    "songs-poems",
    "education",
    "law",
    "kids",
    "platitudes",
)
"""General VALIDATION text: what ``lora-dapt tune`` measures forgetting on in the ``tune`` candidates and what
the ``replay`` candidates replay. Other files of the same package than the table's general text, so that
neither the choice nor the training ever sees the text the table is scored on (as a user would replay a
sample of a general corpus and score forgetting on its held-out documents)."""

OLD_DEFAULTS = {
    "train.batch_size": 1,
    "train.gradient_accumulation_steps": 8,
    "train.warmup_ratio": 0.0,
    "train.warmup_steps": 0,
    "train.learning_rate": 2e-4,
    "adapter.r": 16,
    "adapter.alpha": 32,
    "adapter.dropout": 0.05,
    "adapter.use_rslora": False,
    "adapter.gradient_checkpointing": True,
    "model.compute_dtype": "float32",
}
"""lora_dapt's training defaults before issue 14 (for the 'old' candidate)."""

VARIANTS: dict[str, dict[str, Any]] = {
    "new": {},
    "lr2e-4": {"train.learning_rate": 2e-4},
    "lr5e-4": {"train.learning_rate": 5e-4},
    "lr7e-4": {"train.learning_rate": 7e-4},
    "lr1e-3": {"train.learning_rate": 1e-3},
    "lr2e-3": {"train.learning_rate": 2e-3},
    "rslora": {"adapter.use_rslora": True, "adapter.alpha": 16},
    "rslora-lr1e-3": {"adapter.use_rslora": True, "adapter.alpha": 16, "train.learning_rate": 1e-3},
    "r64": {"adapter.r": 64, "adapter.alpha": 128},
    "drop0.05": {"adapter.dropout": 0.05},
    "r32": {"adapter.r": 32, "adapter.alpha": 64},
    "r32-lr1e-3": {"adapter.r": 32, "adapter.alpha": 64, "train.learning_rate": 1e-3},
    "lr1e-3-floor0": {"train.learning_rate": 1e-3, "train.min_lr_ratio": 0.0},
    "bs8": {"train.batch_size": 8},
    "bs2": {"train.batch_size": 2},
    "replay5": {"data.replay_sources": "VALIDATION", "data.replay_fraction": 0.05},
    "replay5-lr1e-3": {
        "data.replay_sources": "VALIDATION",
        "data.replay_fraction": 0.05,
        "train.learning_rate": 1e-3,
    },
    "old": OLD_DEFAULTS,
}
"""Overrides of the defaults. ``"VALIDATION"`` stands for the general validation text (``TUNE_GENERAL_FILES``)."""

TUNES: dict[str, dict[str, Any]] = {"tune": {}, "tune-replay5": VARIANTS["replay5"]}
"""``lora-dapt tune`` candidates: the config it starts from (overrides of the defaults, as VARIANTS)."""


# ---------------------------------------------------------------------------------------------------------------
# Corpora (documents) and general text
# ---------------------------------------------------------------------------------------------------------------


def stdlib_docs() -> list[tuple[str, str]]:
    from lora_dapt.cli.quickstart import python_docs_corpus

    with tempfile.TemporaryDirectory() as d:
        return [(p.stem, p.read_text(encoding="utf-8")) for p in python_docs_corpus(d)]


def man_docs(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """Section-1 manual pages rendered as plain text (``man -l``), 3-60k characters each. The Google Cloud
    SDK's thousands of generated ``gcloud`` pages (near-copies of each other) are left out."""
    pages = sorted(p for p in Path("/usr/share/man/man1").glob("*.1.gz") if not p.name.startswith("gcloud"))
    random.Random(seed).shuffle(pages)
    out = []
    for page in pages:
        if len(out) >= n:
            break
        try:
            raw = gzip.decompress(page.read_bytes())
        except OSError:
            continue
        if b".so " in raw[:200]:  # an alias page
            continue
        run = subprocess.run(
            ["man", "-l", "-P", "cat", "-"],
            input=raw,
            capture_output=True,
            env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            timeout=30,
        )
        text = re.sub(r".\x08", "", run.stdout.decode("utf-8", "replace"))
        if 3000 <= len(text) <= 60000:
            out.append((page.name.removesuffix(".1.gz"), text))
    return out


def fortunes_texts(chunk_chars: int = 2000, files: tuple[str, ...] = FORTUNE_FILES) -> list[str]:
    if not FORTUNES.is_dir():
        sys.exit("general text: apt install fortunes (the Debian package's quotations)")
    entries = []
    for name in files:
        text = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        entries += [e.strip() for e in text.split("\n%\n") if e.strip()]
    docs, cur = [], ""
    for e in entries:
        cur = f"{cur}\n\n{e}" if cur else e
        if len(cur) >= chunk_chars:
            docs.append(cur)
            cur = ""
    return docs


def split_by_document(docs: list[tuple[str, str]], held_out: float, seed: int) -> tuple[list, list]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(held_out * len(docs)))
    ev = sorted(order[:n_eval])
    tr = sorted(order[n_eval:])
    return [docs[i] for i in tr], [docs[i] for i in ev]


def write_docs(docs: list[tuple[str, str]], d: Path) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in docs:
        p = d / f"{name}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Independent scoring: plain transformers + peft
# ---------------------------------------------------------------------------------------------------------------


def token_windows(tokenizer: Any, texts: list[str], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Each text tokenized alone (EOS appended), cut into non-overlapping windows of at most seq_len."""
    windows, total = [], 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for i in range(0, len(ids) - 1, seq_len):
            w = ids[i : i + seq_len]
            if len(w) >= 2:
                windows.append(w)
                total += len(w) - 1
        if total >= max_tokens:
            break
    return windows


@torch.no_grad()
def ppl(model: Any, windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        out = model(input_ids=ids)
        logits = out.logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


def load_16bit(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    return m.eval()


def score_adapter(base: Path, adapter: Path | None, sets: dict[str, list[list[int]]]) -> dict[str, float]:
    from peft import PeftModel

    model = load_16bit(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    out = {name: ppl(model, w) for name, w in sets.items()}
    del model
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training: lora_dapt candidates and the hand-written recipe
# ---------------------------------------------------------------------------------------------------------------


def run_lora_dapt(raw: dict) -> tuple[Path, float]:
    """One lora_dapt run of the config :func:`raw_config` built: its adapter and its training tokens/s."""
    import lora_dapt as ld

    result = ld.run(ld.RunConfig.from_dict(raw))
    return Path(result.adapter_dir), float(result.tokens_per_s)


def raw_config(
    base: Path,
    train_paths: list[str],
    eval_paths: list[str],
    overrides: dict,
    budget: int,
    seq: int,
    out: Path,
    validation: Path,
) -> dict:
    """The candidate's config: the defaults with only model, data, seq_len and the token budget set, then
    ``overrides`` (``"VALIDATION"``: the general validation directory)."""
    raw = {
        "model": {"name_or_path": str(base), "quantization": "nf4"},
        "data": {"sources": train_paths, "eval_sources": eval_paths, "seq_len": seq},
        "train": {"output_dir": str(out), "max_tokens": budget, "overwrite": True, "save_every": 0},
        "eval": {"enabled": False, "general_sources": [str(validation)]},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = [str(validation)] if value == "VALIDATION" else value
    return raw


def write_validation(directory: Path) -> Path:
    """The general validation text (:data:`TUNE_GENERAL_FILES`) as text files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(fortunes_texts(files=TUNE_GENERAL_FILES)):
        (directory / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    return directory


def run_recipe(base: Path, train_texts: list[str], budget: int, seq: int, out: Path) -> tuple[Path, float]:
    """The hand-written recipe of issue 14: what a user writes from the transformers + peft docs."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.pad_token = tok.pad_token or tok.eos_token
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=bnb, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    ds = Dataset.from_dict({"text": train_texts})
    ds = ds.map(lambda b: tok([t + tok.eos_token for t in b["text"]]), batched=True, remove_columns=["text"])

    def group_texts(batch: dict) -> dict:
        ids = [i for x in batch["input_ids"] for i in x]
        n = len(ids) // seq * seq
        return {"input_ids": [ids[i : i + seq] for i in range(0, n, seq)]}

    ds = ds.map(group_texts, batched=True, remove_columns=ds.column_names).shuffle(seed=42)
    ds = ds.select(range(min(len(ds), math.ceil(budget / seq))))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a float below 1 is a ratio (transformers 5 dropped warmup_ratio)
        num_train_epochs=1,
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    model.save_pretrained(str(out / "adapter"))
    return out / "adapter", len(ds) * seq / wall


def run_tune(
    base: Path,
    train_paths: list[str],
    eval_paths: list[str],
    budget: int,
    seq: int,
    out: Path,
    validation: Path,
    overrides: dict,
    learning_rates: list[float],
    probe_tokens: int | None,
) -> tuple[Path, float, dict]:
    """What a user does: ``lora-dapt tune`` on the candidate's config (validating on general text that is not
    the table's), then ``lora-dapt train`` on the chosen config, for the same token budget."""
    import lora_dapt as ld

    raw = raw_config(base, train_paths, eval_paths, overrides, budget, seq, out / "run", validation)
    options = {"budget_tokens": probe_tokens, "output_dir": str(out / "tune"), "overwrite": True}
    if learning_rates:
        options["learning_rates"] = learning_rates
    t0 = time.time()
    result = ld.tune(ld.RunConfig.from_dict(raw), **options)
    tune_s = time.time() - t0
    print(result.table(), flush=True)
    if result.chosen is None:
        sys.exit("tune chose nothing (no trial inside the forgetting budget)")
    chosen = next(t for t in result.trials if t.trial == result.chosen)
    cfg = ld.RunConfig.from_yaml(result.chosen_config)
    trained = ld.run(cfg)
    info = {
        "tune_s": tune_s,
        "chosen_lr": chosen.learning_rate,
        "chosen_r": chosen.r,
        "trials": len(result.trials),
    }
    return Path(trained.adapter_dir), float(trained.tokens_per_s), info


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=["stdlib", "man"], default="stdlib")
    ap.add_argument("--candidates", default="recipe,old,new")
    ap.add_argument("--budget", type=int, default=40_000, help="training tokens per candidate")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16_000, help="tokens scored per split")
    ap.add_argument("--json", type=Path, default=None, help="append each row to this JSONL file")
    ap.add_argument(
        "--tune-lrs", default="", help="the tune candidate's learning rates (default: tune's grid)"
    )
    ap.add_argument("--tune-tokens", type=int, default=None, help="tune's probe budget (default: tune's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    base = smollm2_dir()
    docs = stdlib_docs() if args.corpus == "stdlib" else man_docs()
    train_docs, eval_docs = split_by_document(docs, 0.1, seed=0)
    work = Path(tempfile.mkdtemp(prefix=f"bench_defaults_{args.corpus}_"))
    train_paths = write_docs(train_docs, work / "train")
    eval_paths = write_docs(eval_docs, work / "heldout")
    validation = write_validation(work / "general_validation")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    sets = {
        "domain": token_windows(tok, [t for _, t in eval_docs], args.seq_len, args.eval_tokens),
        "general": token_windows(tok, fortunes_texts(), args.seq_len, args.eval_tokens),
    }
    print(
        f"corpus {args.corpus}: {len(train_docs)} train / {len(eval_docs)} held-out documents; scored "
        f"{sum(len(w) - 1 for w in sets['domain'])} domain and {sum(len(w) - 1 for w in sets['general'])} "
        f"general tokens; budget {args.budget} training tokens at seq {args.seq_len}",
        flush=True,
    )
    before = score_adapter(base, None, sets)
    print(f"original 16-bit base: {before}", flush=True)
    rows = []
    for name in args.candidates.split(","):
        out = work / name
        t0 = time.time()
        info: dict = {}
        if name == "recipe":
            adapter, tps = run_recipe(base, [t for _, t in train_docs], args.budget, args.seq_len, out)
        elif name in TUNES:
            lrs = [float(x) for x in args.tune_lrs.split(",") if x]
            adapter, tps, info = run_tune(
                base,
                train_paths,
                eval_paths,
                args.budget,
                args.seq_len,
                out,
                validation,
                TUNES[name],
                lrs,
                args.tune_tokens,
            )
        else:
            raw = raw_config(
                base, train_paths, eval_paths, VARIANTS[name], args.budget, args.seq_len, out, validation
            )
            adapter, tps = run_lora_dapt(raw)
        after = score_adapter(base, adapter, sets)
        gc.collect()
        row = {
            "corpus": args.corpus,
            "candidate": name,
            "domain_before": before["domain"],
            "domain_after": after["domain"],
            "domain_change": after["domain"] / before["domain"] - 1,
            "general_before": before["general"],
            "general_after": after["general"],
            "general_change": after["general"] / before["general"] - 1,
            "train_tokens_per_s": tps,
            "wall_s": time.time() - t0,
            **info,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print_table(
        [
            "corpus",
            "candidate",
            "domain ppl (16-bit)",
            "change",
            "general ppl (16-bit)",
            "change",
            "train tok/s",
        ],
        [
            [
                r["corpus"],
                r["candidate"],
                f"{r['domain_before']:.2f} -> {r['domain_after']:.2f}",
                f"{100 * r['domain_change']:+.1f}%",
                f"{r['general_before']:.2f} -> {r['general_after']:.2f}",
                f"{100 * r['general_change']:+.1f}%",
                f"{r['train_tokens_per_s']:.0f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
