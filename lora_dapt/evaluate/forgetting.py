"""Forgetting: the model before and after training, on the domain and on general text.

Continued pre-training lowers the domain perplexity; the question is what it costs elsewhere. So every
evaluation scores two splits, the held-out domain blocks and a general-English sample, and
:func:`forgetting_report` compares them before and after: the domain number should fall, a rise of the
general one is forgetting (the number ``EvalConfig.max_general_ppl_increase`` budgets).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import EvalConfig
from ..data.sources import read_text_sources
from ..errors import DataError
from ..rundir import EvalRow, RunDir
from .generate import generate_samples
from .score import EvalResult, evaluate_blocks, evaluate_texts

log = logging.getLogger("lora_dapt")


def evaluate_splits(
    model: Any,
    tokenizer: Any,
    eval_ds: Any,
    general_texts: list[str] | None,
    eval_cfg: EvalConfig,
    *,
    step: int,
    phase: str,
    run_dir: Path,
    tokens_trained: int = 0,
) -> dict[str, Any]:
    """Domain (held-out blocks) and general (texts) evaluation at one point of a run, logged as one
    :class:`~lora_dapt.rundir.EvalRow` per split in the run's metrics log; greedy samples of
    ``eval_cfg.prompts`` are added before and after training.

    In a row, ``tokens`` is the number of tokens trained so far (the x axis of the plots) and ``eval_tokens``
    the number of tokens scored. Returns ``{"domain": EvalResult dict, "general": ..., "samples": [...]}``
    (each only when there was something to evaluate).
    """
    out: dict[str, Any] = {}
    if eval_ds is not None and len(eval_ds) > 0:
        seq_len = len(eval_ds[0]["input_ids"])
        max_blocks = None if eval_cfg.max_eval_tokens is None else max(1, eval_cfg.max_eval_tokens // seq_len)
        out["domain"] = evaluate_blocks(
            model,
            eval_ds,
            batch_size=eval_cfg.batch_size,
            max_blocks=max_blocks,
            desc=f"eval domain ({phase})",
        ).to_dict()
    if general_texts:
        out["general"] = evaluate_texts(
            model,
            tokenizer,
            general_texts,
            batch_size=eval_cfg.batch_size,
            max_tokens=eval_cfg.max_eval_tokens,
            desc=f"eval general ({phase})",
        ).to_dict()
    run = RunDir(run_dir)
    for split, res in out.items():
        run.append_metric(EvalRow(step=step, phase=phase, split=split, result=res, tokens=tokens_trained))
        log.info("%s eval %s: loss %.4f ppl %.3f", phase, split, res["loss"], res["ppl"])
    if eval_cfg.prompts and phase in ("before", "after"):
        out["samples"] = generate_samples(
            model, tokenizer, eval_cfg.prompts, max_new_tokens=eval_cfg.max_new_tokens
        )
    return out


GENERAL_ENGLISH_FILE = "general_english.txt"
"""Package data of this subpackage: the built-in general text, one text per line ('#' lines: comments)."""


def _builtin_general_texts() -> list[str]:
    """The built-in everyday-English sample (package data; see :func:`general_texts` for why this text)."""
    text = resources.files(__package__).joinpath(GENERAL_ENGLISH_FILE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def general_texts(
    sources: str | Path | Sequence[str | Path] | None = None, max_chars: int = 50_000
) -> list[str]:
    """General-domain English to measure forgetting on: ``sources`` when given, else a built-in sample.

    With ``sources`` (files, directories or globs of .txt/.md/.rst, as ``EvalConfig.general_sources``),
    their texts are returned, the total cut at ``max_chars`` characters (the last text shortened). For a
    trustworthy forgetting number give your own general text, e.g. a few hundred KB of news or encyclopedia
    prose of the kind the base model was trained on.

    Without sources, the built-in sample: twelve short paragraphs of everyday English (a market, a
    letter, a recipe, a football match, a journey, ...), about 5,700 characters written for lora_dapt and
    shipped with it under its own license. Why not text already on the machine:

    * ``pydoc_data.topics`` (the Python language reference, 450 KB, in every CPython) is technical prose
      about Python by the same community that wrote the standard-library docstrings our quickstart trains
      on: training would lower its perplexity and hide forgetting.
    * License texts (CPython's LICENSE.txt, /usr/share/common-licenses) are not on every install (Debian's
      python strips LICENSE.txt) and are legal boilerplate that models have memorised.
    * ``this`` (the Zen of Python) is 20 lines.

    The sample is small, so its perplexity is noisy in absolute terms, but before/after are measured on the
    same text, which is what the forgetting report compares.

    Example::

        texts = general_texts()                          # built-in sample
        texts = general_texts(["wiki_sample/*.txt"])     # your own general text
    """
    if sources is None or (not isinstance(sources, (str, Path)) and len(sources) == 0):
        log.info(
            "general eval text: built-in everyday-English sample (set eval.general_sources for your own)"
        )
        texts = _builtin_general_texts()
    else:
        texts = read_text_sources(sources)
    out, left = [], max_chars
    for text in texts:
        if left <= 0:
            break
        text = text[:left]
        if text.strip():
            out.append(text)
        left -= len(text)
    if not out:
        raise DataError(f"general_sources {sources!r} hold no text; give non-empty files or leave them unset")
    return out


def _metric(entry: Any, key: str) -> float | None:
    if entry is None:
        return None
    if isinstance(entry, EvalResult):
        entry = entry.to_dict()
    if isinstance(entry, (int, float)):  # a bare perplexity
        return float(entry) if key == "ppl" else None
    value = entry.get(key) if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _relative(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or not math.isfinite(before) or before == 0:
        return None
    return after / before - 1


def forgetting_report(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Compare evaluations before and after training, per split.

    ``before`` and ``after`` map a split name (``"domain"``, ``"general"``) to an :class:`EvalResult`, its
    ``to_dict()`` or a bare perplexity; other entries (such as ``"samples"``) are ignored. Returns, per split
    present in either::

        {"domain": {"ppl_before", "ppl_after", "ppl_change", "bpb_before", "bpb_after", "bpb_change"}, ...}

    where ``*_change`` is the relative change ``after / before - 1`` (-0.2: 20% lower), None where a side is
    missing. Domain perplexity should fall; a rise of general perplexity is forgetting.

    Example::

        >>> forgetting_report({"domain": 20.0, "general": 10.0}, {"domain": 15.0, "general": 11.0})["general"]
        {'ppl_before': 10.0, 'ppl_after': 11.0, 'ppl_change': 0.10000000000000009, 'bpb_before': None, \
'bpb_after': None, 'bpb_change': None}
    """
    before, after = before or {}, after or {}
    # Other entries (the trainer keeps generation "samples" beside the splits) are not evaluations.
    names = {k for side in (before, after) for k, v in side.items() if _metric(v, "ppl") is not None}
    splits = [s for s in ("domain", "general") if s in names] + sorted(names - {"domain", "general"})
    report: dict[str, Any] = {}
    for split in splits:
        row: dict[str, Any] = {}
        for key, short in (("ppl", "ppl"), ("bits_per_byte", "bpb")):
            b, a = _metric(before.get(split), key), _metric(after.get(split), key)
            row.update({f"{short}_before": b, f"{short}_after": a, f"{short}_change": _relative(b, a)})
        scored = [n for n in (_metric(before.get(split), "tokens"), _metric(after.get(split), "tokens")) if n]
        if scored and min(scored) < MIN_EVAL_TOKENS:
            row["note"] = _few_tokens(split, int(min(scored)))
            log.warning("%s", row["note"])
        report[split] = row
    return report


MIN_EVAL_TOKENS = 1000
"""Below this many scored tokens a perplexity change is noise, and the report says so."""


def _few_tokens(split: str, n: int) -> str:
    fix = (
        "hold out more (data.eval_fraction) or give data.eval_sources"
        if split == "domain"
        else "give more general text (eval.general_sources)"
    )
    return (
        f"the {split} eval scored only {n:,} tokens (fewer than {MIN_EVAL_TOKENS:,}): its perplexity change is "
        f"noise, not a measurement; {fix}"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_forgetting(report: dict[str, Any]) -> str:
    """An aligned text table of :func:`forgetting_report` (what ``lora-dapt`` prints).

    Example::

        >>> print(format_forgetting(forgetting_report({"domain": 20.0}, {"domain": 15.0})))
        split   ppl before  ppl after  change  bpb before  bpb after
        domain       20.00      15.00  -25.0%           -          -
    """
    header = ("split", "ppl before", "ppl after", "change", "bpb before", "bpb after")
    rows = [header]
    for split, r in report.items():
        rows.append(
            (
                split,
                _fmt(r.get("ppl_before"), ".2f"),
                _fmt(r.get("ppl_after"), ".2f"),
                _fmt(None if r.get("ppl_change") is None else 100 * r["ppl_change"], "+.1f")
                + ("%" if r.get("ppl_change") is not None else ""),
                _fmt(r.get("bpb_before"), ".4f"),
                _fmt(r.get("bpb_after"), ".4f"),
            )
        )
    notes = [r["note"] for r in report.values() if r.get("note")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join([line.rstrip() for line in lines] + [f"note: {n}" for n in notes])
