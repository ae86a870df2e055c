"""What :func:`~lora_dapt.data.corpus.prepare_corpus` returns: the packed blocks (:class:`Corpus`) and what
happened to every document and token on the way (:class:`CorpusStats`, stored as ``stats.json`` with the
cached corpus)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import datasets

PROBLEMS = {
    "not_found": "sources that matched no file",
    "unknown_extension": "files with an unknown extension (skipped; read one as text with data.extensions: "
    "['+.ext'])",
    "excluded_extension": "files of an extension data.extensions leaves out (skipped)",
    "binary": "binary files (skipped)",
    "unreadable": "unreadable files (skipped)",
    "bad_rows": "rows without a usable text field (skipped)",
    "hidden": "hidden files/directories (skipped)",
    "undecodable": "files with undecodable bytes (replaced by U+FFFD, kept)",
    "invalid_json": "rows that are not valid JSON (skipped)",
    "empty_file": "files or datasets without any row (skipped)",
    "not_regular": "not regular files: FIFOs, sockets, devices (skipped, never opened)",
    "symlink_loop": "symlinks to a directory above them (not followed)",
    "seen_twice": "files or directories reached again through a symlink (read once)",
    "transcoded": "UTF-16/UTF-32 files (decoded by their byte order mark, kept)",
    "split": "documents longer than 1M characters (cut into parts, kept)",
}
"""Problem kinds that concern files or rows (not documents dropped by cleaning), with a readable label."""


DROPS = {
    "empty": "empty",
    "too_short": "shorter than min_chars",
    "duplicate": "exact duplicates",
    "near_duplicate": "near duplicates",
    "in_eval": "identical to an eval document",
}
"""Reasons a document is dropped, with a readable label."""


@dataclass
class ComponentStats:
    """One component of the training mix (``data.mixture``, or the domain and replay of the short form)."""

    name: str
    weight: float
    """Planned fraction of the training tokens (the weights normalised to sum to 1)."""
    tokens: int = 0
    """Training tokens taken from this component (special tokens included)."""
    fraction: float = 0.0
    """tokens / train_tokens, as achieved."""
    documents: int = 0
    """Documents the component's tokens come from (the last one may be cut to fit the share)."""
    available_tokens: int | None = None
    """Tokens the component held after cleaning; None when more than its share and not all tokenized."""
    limiting: bool = False
    """This component had the fewest tokens for its weight: it is used whole and sets the mixture's size."""
    documents_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Documents dropped by cleaning, by reason (duplicates within the component, in_eval, ...)."""

    @property
    def unused_tokens(self) -> int | None:
        """Tokens left out to keep the fractions (None when not known)."""
        return None if self.available_tokens is None else self.available_tokens - self.tokens


@dataclass
class CorpusStats:
    """What happened to every document and token; ``summary()`` is the human-readable form."""

    files_read: int = 0
    """Files opened (table files count once, whatever their row count)."""
    documents_read: int = 0
    """Documents found (a file, a table row, a text); a document cut into parts counts once per part."""
    documents_kept: int = 0
    """Documents left after cleaning (train + eval, replay not included)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Documents dropped, by reason: empty, too_short, duplicate, near_duplicate, in_eval."""
    problems: dict[str, int] = field(default_factory=dict)
    """Files/rows that needed attention, by kind (see ``examples`` for names)."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Up to 10 names (file, file:line, dataset[i]) for each drop reason and problem kind."""
    normalized: int = 0
    """Documents changed by unicode/whitespace normalisation."""
    train_documents: int = 0
    eval_documents: int = 0
    characters: int = 0
    """Characters of the kept (train + eval) documents after cleaning."""
    train_tokens: int = 0
    """Non-padding tokens in the training blocks, special tokens and replay included."""
    eval_tokens: int = 0
    special_tokens: int = 0
    """BOS/EOS tokens added (train + eval + replay)."""
    train_blocks: int = 0
    eval_blocks: int = 0
    padding_tokens: int = 0
    """Padding tokens in train + eval blocks."""
    padding_fraction: float = 0.0
    """padding_tokens / (all block tokens)."""
    continuation_pieces: int = 0
    """Pieces that continue a long document: their first token is an input but not a target."""
    gap_fill_cuts: int = 0
    """Extra cuts packing made in long documents' pieces to fill block gaps instead of padding them (each is
    one more first token that is an input but not a target)."""
    tokens_per_char: float = 0.0
    """Text tokens (no special tokens) per character of the kept documents."""
    replay_documents: int = 0
    replay_tokens: int = 0
    """Training tokens from replay_sources, or from the mixture components after the first (special tokens
    included)."""
    replay_fraction: float = 0.0
    """replay_tokens / train_tokens, as achieved."""
    mixture: list[ComponentStats] = field(default_factory=list)
    """Tokens per component of the training mix, planned and achieved (empty without replay or mixture)."""
    seq_len: int = 0
    add_bos: bool = False
    add_eos: bool = True
    seconds: float = 0.0
    """Time to prepare (or to load from the cache)."""
    cached: bool = False
    """True when the blocks were loaded from the cache instead of computed."""
    cache_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusStats:
        names = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in data.items() if k in names})
        out.mixture = [ComponentStats(**c) if isinstance(c, dict) else c for c in out.mixture]
        return out

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.eval_tokens

    def examples_of(self, kind: str) -> str:
        """The first three example names of a drop reason or problem kind, comma-separated ('' if none)."""
        return ", ".join(self.examples.get(kind, [])[:3])

    def what_happened(self) -> str:
        """One line for error messages: files and documents read, then every drop and problem (with examples)."""
        parts = [f"{self.files_read} files read", f"{self.documents_read} documents"]
        parts += [f"{n} {DROPS.get(k, k)}" for k, n in self.dropped.items() if n]
        parts += [
            f"{n} {PROBLEMS.get(k, k)}" + (f" ({self.examples_of(k)})" if self.examples.get(k) else "")
            for k, n in self.problems.items()
            if n
        ]
        return "; ".join(parts)

    def log_line(self) -> str:
        """One line for the log."""
        drops = ", ".join(f"{n} {k}" for k, n in self.dropped.items() if n) or "none"
        return (
            f"corpus: {self.documents_read} documents read, {self.documents_kept} kept (dropped: {drops}); "
            f"{self.tokens:,} tokens in {self.train_blocks} train + {self.eval_blocks} eval blocks of "
            f"{self.seq_len}; padding {self.padding_fraction:.2%}; {self.tokens_per_char:.3f} tokens/char; "
            f"replay {self.replay_tokens:,} tokens ({self.replay_fraction:.1%})"
            + (" [cached]" if self.cached else "")
        )

    def summary(self) -> str:
        """Multi-line human-readable report (what `lora-dapt prepare` prints)."""
        lines = [
            f"files read:        {self.files_read}",
            f"documents read:    {self.documents_read}",
            f"documents kept:    {self.documents_kept} ({self.train_documents} train, {self.eval_documents} eval)",
        ]
        for k, n in self.dropped.items():
            if n:
                ex = self.examples_of(k)
                lines.append(f"  dropped {DROPS.get(k, k)}: {n}" + (f" (e.g. {ex})" if ex else ""))
        if self.normalized:
            lines.append(f"  normalised: {self.normalized}")
        for k, n in self.problems.items():
            if n:
                ex = self.examples_of(k)
                lines.append(f"{PROBLEMS.get(k, k)}: {n}" + (f" (e.g. {ex})" if ex else ""))
        lines += [
            f"tokens:            {self.tokens:,} ({self.train_tokens:,} train, {self.eval_tokens:,} eval; "
            f"{self.special_tokens:,} BOS/EOS)",
            f"blocks:            {self.train_blocks} train + {self.eval_blocks} eval x {self.seq_len} tokens",
            f"padding:           {self.padding_tokens:,} tokens ({self.padding_fraction:.2%})",
            f"long-doc pieces:   {self.continuation_pieces} continuation pieces"
            + (f" (+{self.gap_fill_cuts} cut to fill block gaps)" if self.gap_fill_cuts else ""),
            f"tokens per char:   {self.tokens_per_char:.3f}",
            f"replay:            {self.replay_tokens:,} tokens from {self.replay_documents} documents "
            f"({self.replay_fraction:.1%} of training tokens)",
            f"special tokens:    BOS {'on' if self.add_bos else 'off'}, EOS {'on' if self.add_eos else 'off'}",
            f"time:              {self.seconds:.1f} s" + (" (loaded from cache)" if self.cached else ""),
        ]
        for c in self.mixture:
            unused = f"; {c.unused_tokens:,} left out to keep the fractions" if c.unused_tokens else ""
            lines.append(
                f"  mix {c.name}: {c.tokens:,} tokens from {c.documents} documents, {c.fraction:.1%} "
                f"(planned {c.weight:.1%}){' [limiting]' if c.limiting else ''}{unused}"
            )
        if self.cache_path:
            lines.append(f"cache:             {self.cache_path}")
        return "\n".join(lines)


def format_stats(stats: CorpusStats) -> str:
    """The multi-line report of :meth:`CorpusStats.summary` (used by ``lora-dapt prepare``)."""
    return stats.summary()


@dataclass
class Corpus:
    """Packed training/eval blocks, the raw held-out texts, and what happened on the way."""

    train: datasets.Dataset
    """Rows of ``input_ids``, ``position_ids``, ``labels``: int lists of exactly ``seq_len``."""
    eval: datasets.Dataset | None
    """Same layout, held-out documents only; None when nothing is held out."""
    stats: CorpusStats
    eval_documents: list[str] = field(default_factory=list)
    """Texts of the eval split (capped at about 5M characters), for perplexity on raw text."""
