"""evaluate.forgetting (split from evaluate, train)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import EvalConfig
from ..data.sources import read_text_sources
from ..errors import DataError
from ..rundir import EvalRow, RunDir
from .score import EvalResult

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
    """Domain (held-out blocks) and general (texts) evaluation; rows go to metrics.jsonl.

    In a row, ``tokens`` is the number of tokens trained so far (the x axis of the plots) and ``eval_tokens``
    the number of tokens scored.
    """
    from .generate import generate_samples
    from .score import evaluate_blocks, evaluate_texts

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
    for split, res in out.items():
        RunDir(run_dir).append_metric(
            EvalRow(step=step, phase=phase, split=split, result=res, tokens=tokens_trained)
        )
        log.info("%s eval %s: loss %.4f ppl %.3f", phase, split, res["loss"], res["ppl"])
    if eval_cfg.prompts and phase in ("before", "after"):
        out["samples"] = generate_samples(
            model, tokenizer, eval_cfg.prompts, max_new_tokens=eval_cfg.max_new_tokens
        )
    return out


# Written for lora_dapt (Apache-2.0 like the code): everyday English on topics far from any technical
# corpus. See general_texts for why this and not text found on the machine.
_GENERAL_ENGLISH = (
    "The market opens early on Saturdays, long before most of the town is awake. By six o'clock the first "
    "vans have backed into their places along the square, and the sellers are unfolding tables, stacking "
    "crates of apples and hanging hand-written signs. An old man who has sold honey there for thirty years "
    "sets out his jars in neat rows, the darkest at the back. Children arrive later with their parents and "
    "stop at the bakery stall, where the smell of warm bread is hard to walk past. By noon most of the "
    "vegetables are gone, and the square slowly returns to being a car park.",
    "Dear Anna, thank you for your letter, which reached me just before the storm. We lost power for two "
    "days, so I read it again by candlelight and laughed at your story about the neighbour's goat. The "
    "garden survived better than I expected: the beans were flattened, but the tomatoes are still standing. "
    "I hope you can visit in the autumn, when the hills turn red and the roads are quiet. Bring warm "
    "clothes, because the evenings are already cold. With love, Margaret.",
    "To make a simple vegetable soup, start by chopping an onion, two carrots and a stick of celery. Soften "
    "them gently in a little oil for about ten minutes, without letting them brown. Add a handful of diced "
    "potatoes, a tin of tomatoes and enough water or stock to cover everything. Let it simmer until the "
    "potatoes are tender, then season with salt and pepper. Some people like to blend it until smooth; "
    "others prefer it chunky. Either way, it tastes even better the next day.",
    "The home team started nervously and fell behind after only eight minutes, when a long ball caught "
    "their defence out of position. For the rest of the first half they struggled to keep possession. "
    "Whatever the coach said at the interval worked: they came out with far more energy, equalised from a "
    "corner within five minutes and scored the winner late in the game with a shot from the edge of the "
    "area. The crowd, which had been quiet for an hour, sang all the way home.",
    "Nobody in the village remembers exactly when the old stone bridge was built, but everyone agrees that "
    "it has outlasted every flood. In the spring of one wet year the river rose so high that water ran "
    "across the road on both sides, yet the bridge itself stood firm. Farmers used to drive their cattle "
    "over it on the way to the summer pastures, and their grandchildren still stop in the middle to drop "
    "sticks into the current and race to the other side to see which one appears first.",
    "If you want tomatoes that taste of something, give them as much sun as you can and do not overwater "
    "them. Plant them deeply, because they grow roots along the buried part of the stem. Pinch out the side "
    "shoots that appear between the main stem and the leaves, and tie the plant loosely to a stake as it "
    "grows. When the fruit begins to ripen, a little less water concentrates the flavour. Pick them when "
    "they are fully coloured and slightly soft.",
    "The dog had been missing for three days when a woman from the next valley telephoned. She had found "
    "him asleep in her barn, thin and muddy but otherwise fine, with his collar still on. The family drove "
    "over that same evening. He heard the car before anyone got out and came running across the yard, "
    "barking so loudly that the hens scattered. On the way home he slept with his head on the youngest "
    "boy's knee and did not move until they reached the front door.",
    "The night train leaves the capital a little after nine and arrives at the coast early the next "
    "morning. The carriages are old but comfortable, and the beds are made up with crisp white sheets. Most "
    "passengers fall asleep soon after the lights of the suburbs disappear. Those who stay awake can watch "
    "small stations pass in the dark, each with a single lamp and a sleepy guard. At dawn the line follows "
    "the shore, and the first thing many travellers see is the sea turning from grey to blue.",
    "The town council met on Tuesday evening to discuss plans for the empty library building. Several "
    "residents argued that it should become a community centre with rooms for clubs and classes, while "
    "others wanted it sold to pay for repairs to the swimming pool. After a long debate the council agreed "
    "to ask local people for their views before making a decision. A public meeting will be held next "
    "month, and written comments can be left at the town hall until the end of the year.",
    "Most adults need between seven and nine hours of sleep a night, although the amount varies from person "
    "to person. Going to bed and getting up at the same time every day, even at weekends, helps the body "
    "keep a steady rhythm. A cool, dark and quiet bedroom makes it easier to fall asleep, and so does "
    "avoiding heavy meals and bright screens late in the evening. A short walk in daylight can also make "
    "a surprising difference to how well you sleep.",
    "When my grandmother was young, the nearest doctor lived a full day's walk away, and letters took weeks "
    "to arrive. She often told us how the whole street would gather around the first radio anyone owned to "
    "listen to the news and the Sunday concert. She never learned to drive, but she travelled more than "
    "anyone else in the family, by bus, by boat and once, at the age of seventy, by aeroplane. She said the "
    "clouds from above looked exactly as she had always imagined them.",
    "Rain had been forecast for the whole weekend, but on Sunday morning the sky cleared and the sun came "
    "out. People who had planned to stay indoors changed their minds, and by ten o'clock the park was full "
    "of families, dogs and runners. The ice cream seller, who had almost not come, ran out of cones before "
    "lunch. In the afternoon the clouds returned, a cold wind picked up, and everyone hurried home just "
    "before the first heavy drops began to fall.",
)


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
        texts = list(_GENERAL_ENGLISH)
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
        report[split] = row
    return report


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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
