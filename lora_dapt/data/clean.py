"""Cleaning and splitting documents: normalisation, minimum length, exact / near-duplicate removal, and the
held-out split by document (shared by the corpus and SFT data).

Every drop is counted under its reason in a :class:`_Tally` (with up to 10 example names), so the corpus
statistics can say what happened to every document.
"""

from __future__ import annotations

import logging
import random
import re
import unicodedata
from collections import Counter

import datasets
import numpy as np

from ..config import DataConfig

log = logging.getLogger("lora_dapt")

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


_TRAILING = re.compile(r"[ \t]+(?=\n)")


_NOTED = ("bad_rows", "unreadable", "invalid_json", "not_regular", "symlink_loop", "seen_twice")
"""Report kinds whose example names carry their note (which lines, what kind of file)."""


def clean_text(text: str, normalize: bool = True) -> str:
    """The normalisation applied to every document when ``DataConfig.normalize`` is on.

    NFC unicode, ``\\r\\n``/``\\r`` -> ``\\n``, control characters other than tab/newline removed, trailing
    spaces of lines removed, leading/trailing blank space of the document removed.

    >>> clean_text("  Cafe\\u0301 \\r\\nline\\x00 two\\t \\n")
    'Café\\nline two'
    """
    if not normalize:
        return text
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CTRL.sub("", text)
    # the regex tries every run of spaces (all indentation, in code); most texts have no trailing ones at all
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("", text)
    return text.strip()


class _Tally:
    """Counts and up to 10 example names per reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, name: str, n: int = 1) -> None:
        self.counts[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 10:
            ex.append(name)


def _shingles(text: str, k: int = 5) -> list[bytes]:
    words = text.split()
    if len(words) <= k:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)]


def _select_documents(
    docs: datasets.Dataset, cfg: DataConfig, tally: _Tally, drop_hashes: set[bytes] | None = None
) -> tuple[list[int], int]:
    """Indices of the document rows that survive cleaning, in order; counts every drop and report.

    Returns (kept indices, number of documents read). ``drop_hashes``: documents with these hashes are
    dropped as ``in_eval`` (training documents identical to an explicit eval document).
    """
    cols = docs.select_columns(["status", "count", "chars", "source", "text", "hash", "note"]).data
    status = cols.column("status").to_pylist()
    count = cols.column("count").to_pylist()
    chars = np.asarray(cols.column("chars").to_numpy())
    notes = cols.column("note").to_pylist()
    hashes = cols.column("hash").to_pylist()
    sources = cols.column("source").to_pylist()
    seen: set[bytes] = set()
    kept: list[int] = []
    n_read = 0
    empty = set()
    for i, st in enumerate(status):
        if st != "ok":
            name = f"{sources[i]} ({notes[i]})" if st in _NOTED else sources[i]
            tally.add(st, name if st != "file_read" else "", count[i])
            continue
        n_read += 1
        if notes[i] == "normalized":
            tally.counts["normalized"] += 1
        if chars[i] == 0:
            empty.add(i)
            tally.add("empty", sources[i])
        elif chars[i] < cfg.min_chars:
            tally.add("too_short", sources[i])
        elif drop_hashes is not None and hashes[i] in drop_hashes:
            tally.add("in_eval", sources[i])
        elif cfg.dedupe and hashes[i] in seen:
            tally.add("duplicate", sources[i])
        else:
            seen.add(hashes[i])
            kept.append(i)
    # a whitespace-only document is empty too (chars counts the cleaned text; without normalisation it may
    # be all blanks)
    if not cfg.normalize:
        texts = cols.column("text")
        still = []
        for i in kept:
            if not texts[i].as_py().strip():
                tally.add("empty", sources[i])
            else:
                still.append(i)
        kept = still
    if cfg.near_dedupe and kept:
        kept = _near_dedupe(docs, kept, cfg.near_dedupe_threshold, tally)
    return kept, n_read


def _near_dedupe(docs: datasets.Dataset, kept: list[int], threshold: float, tally: _Tally) -> list[int]:
    from datasketch import MinHash, MinHashLSH

    from ..progress import track

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    out = []
    texts = docs.data.column("text")
    sources = docs.data.column("source")
    for i in track(kept, "near-duplicates", unit="doc", disable=len(kept) < 1000):
        m = MinHash(num_perm=128, seed=1)
        m.update_batch(_shingles(texts[i].as_py()))
        if lsh.query(m):
            tally.add("near_duplicate", sources[i].as_py())
            continue
        lsh.insert(str(i), m)
        out.append(i)
    return out


def held_out(n: int, fraction: float, seed: int) -> set[int]:
    """Which of ``n`` items (documents, conversations) go to eval: a seeded shuffle's first
    ``round(fraction * n)``, at least one and never all of them (none when ``n < 2``).

    >>> sorted(held_out(10, 0.2, seed=0))
    [7, 8]
    """
    n_eval = min(max(round(fraction * n), 1), n - 1) if fraction > 0 and n >= 2 else 0
    ids = list(range(n))
    random.Random(seed).shuffle(ids)
    return set(ids[:n_eval])


def _split(
    docs: datasets.Dataset, kept: list[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Hold out whole documents: all rows of a group (a file's parts) go to the same side."""
    groups = docs.data.column("group")
    order: dict[str, int] = {}
    for i in kept:
        order.setdefault(groups[i].as_py(), len(order))
    if fraction > 0 and len(order) == 1:
        log.warning("only one document: nothing held out for evaluation (add documents or eval_sources)")
    held = held_out(len(order), fraction, seed)
    train, ev = [], []
    for i in kept:
        (ev if order[groups[i].as_py()] in held else train).append(i)
    return train, ev
