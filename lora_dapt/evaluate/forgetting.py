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
from .probes import ProbeSet, score_probes
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
    probes: ProbeSet | None = None,
    log_rows: bool = True,
) -> dict[str, Any]:
    """Domain (held-out blocks) and general (texts) evaluation at one point of a run, logged as one
    :class:`~lora_dapt.rundir.EvalRow` per split in the run's metrics log (unless ``log_rows`` is False: the
    original 16-bit model's scores, which are not the model as trained); before and after training, also
    greedy samples of ``eval_cfg.prompts``, the accuracy on ``probes`` and the ``eval_cfg.lm_eval_tasks``.

    In a row, ``tokens`` is the number of tokens trained so far (the x axis of the plots) and ``eval_tokens``
    the number of tokens scored. Returns ``{"domain": EvalResult dict, "general": ..., "samples": [...],
    "probes": {...}, "lm_eval": {...}}`` (each only when there was something to evaluate).
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
        if log_rows:
            run.append_metric(EvalRow(step=step, phase=phase, split=split, result=res, tokens=tokens_trained))
        log.info("%s eval %s: loss %.4f ppl %.3f", phase, split, res["loss"], res["ppl"])
    if phase not in ("before", "after"):
        return out
    if eval_cfg.prompts:
        out["samples"] = generate_samples(
            model, tokenizer, eval_cfg.prompts, max_new_tokens=eval_cfg.max_new_tokens
        )
    if probes is not None:
        out["probes"] = score_probes(model, tokenizer, probes)
    if eval_cfg.lm_eval_tasks:
        from .lm_eval import run_lm_eval  # the optional package is imported only when tasks are asked for

        out["lm_eval"] = run_lm_eval(
            model,
            tokenizer,
            eval_cfg.lm_eval_tasks,
            include_path=eval_cfg.lm_eval_include_path,
            batch_size=eval_cfg.batch_size,
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


def compare_before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a run's summary says about before -> after, the ORIGINAL 16-bit model first when it was scored.

    ``before`` / ``after`` are the run's evaluations (split -> result; ``"original_16bit"``: the original
    16-bit model and the adapter on it, see :mod:`lora_dapt.evaluate.original`; ``"probes"``, ``"lm_eval"``).
    Returns ``{"forgetting": the headline report (against the original 16-bit model when both sides scored
    it, else the base as trained), "forgetting_as_trained": the 4-bit report when the headline is the 16-bit
    one (else {}), "forgetting_reference": what the headline compares with, "probes": {base: probe report},
    "lm_eval": {base: {"before", "after"}}}``.
    """
    from .original import ORIGINAL
    from .probes import probes_report

    before, after = before or {}, after or {}
    trained = forgetting_report(before, after) if before and after else {}
    orig_b, orig_a = before.get(ORIGINAL) or {}, after.get(ORIGINAL) or {}
    original = forgetting_report(orig_b, orig_a) if orig_b and orig_a else {}
    out: dict[str, Any] = {
        "forgetting": original or trained,
        "forgetting_as_trained": trained if original else {},
        "forgetting_reference": (
            f"the original 16-bit model ({orig_b.get('dtype')}); after: the adapter on it (what the merge ships)"
            if original
            else "the base as trained"
        ),
        "probes": {},
        "lm_eval": {},
    }
    for name, b, a in (("original_16bit", orig_b, orig_a), ("as_trained", before, after)):
        if b.get("probes") or a.get("probes"):
            out["probes"][name] = probes_report(b.get("probes"), a.get("probes"))
        if b.get("lm_eval") or a.get("lm_eval"):
            out["lm_eval"][name] = {"before": b.get("lm_eval"), "after": a.get("lm_eval")}
    return out


def _rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for split, r in report.items():
        change = r.get("ppl_change")
        rows.append(
            (
                split,
                _fmt(r.get("ppl_before"), ".2f"),
                _fmt(r.get("ppl_after"), ".2f"),
                _fmt(None if change is None else 100 * change, "+.1f") + ("%" if change is not None else ""),
                _fmt(r.get("bpb_before"), ".4f"),
                _fmt(r.get("bpb_after"), ".4f"),
            )
        )
    return rows


def format_forgetting(
    report: dict[str, Any], as_trained: dict[str, Any] | None = None, reference: str | None = None
) -> str:
    """An aligned text table of :func:`forgetting_report` (what ``lora-dapt`` prints).

    With ``as_trained`` (a run that scored the original 16-bit model: ``report`` is against it), two groups:
    first ``report`` under a heading naming ``reference``, then the 4-bit figures as trained.

    Example::

        >>> print(format_forgetting(forgetting_report({"domain": 20.0}, {"domain": 15.0})))
        split   ppl before  ppl after  change  bpb before  bpb after
        domain       20.00      15.00  -25.0%           -          -
    """
    header = ("split", "ppl before", "ppl after", "change", "bpb before", "bpb after")
    groups = [(None, _rows(report))]
    if as_trained:
        groups = [
            (f"against {reference or 'the original 16-bit model'}:", _rows(report)),
            ("the 4-bit base as trained (adapter on it after):", _rows(as_trained)),
        ]
    every = [header] + [row for _, rows in groups for row in rows]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)).rstrip()

    lines = [line(header)]
    for heading, rows in groups:
        lines += ([heading] if heading else []) + [line(r) for r in rows]
    notes = [r["note"] for part in (report, as_trained or {}) for r in part.values() if r.get("note")]
    return "\n".join(lines + [f"note: {n}" for n in notes])
