"""Raw text -> cleaned documents -> train/eval split by document -> packed token blocks.

:func:`prepare_corpus` reads files, globs, directories, ``datasets`` datasets or in-memory texts, cleans and
de-duplicates them, holds out whole documents for evaluation, mixes in general-domain "replay" text, tokenizes
and packs with :mod:`lora_dapt.packing`. It returns a :class:`Corpus` whose ``train``/``eval`` rows are
``input_ids``, ``position_ids``, ``labels`` (int lists of exactly ``seq_len``) and whose ``stats`` say what
happened to every document and token.

Design choices and their trade-offs:

* Nothing vanishes silently. A file that cannot be used (binary, unknown extension, unreadable, rows without
  the text field) becomes a *report row* in the same Arrow table as the documents, so it is counted and
  named in ``stats`` even when the work ran in several processes. Undecodable bytes are replaced by U+FFFD
  and the file is kept and named. Every dropped document is counted under its reason.
* Larger than RAM: documents are streamed from disk into Arrow files (``datasets`` memory-maps them); a huge
  file or single line is read in chunks and cut at line breaks into parts of about 1M characters (BOS on the
  first part, EOS on the last). Only small per-document columns (hashes, group keys, lengths) are ever held
  in Python. A fast tokenizer encodes one batch in a worker thread (Rust uses every core) while the
  previous batch is cut into pieces and written; a Python tokenizer runs as a ``datasets`` map with
  ``num_proc`` processes. Packing works on batches of
  pieces, so padding is only the slack left in the last few blocks of each batch (well under 1%).
* Split by document: whole documents (all parts of a file) go to eval, chosen by a seeded shuffle, so no
  text is in both splits; with ``eval_sources``, training documents identical to an eval document are
  dropped (counted as ``in_eval``).
* Cache: the result is stored under ``cache_dir/lora_dapt-corpus/<key>`` where the key hashes the inputs
  (paths with size and mtime, dataset fingerprints, text hashes), the data config and the tokenizer. The same
  inputs load the stored blocks instead of recomputing them. An ``IterableDataset`` cannot be fingerprinted,
  so a corpus built from one is not cached.
* Near-duplicate removal (MinHash LSH) is a sequential Python pass: fine for hundreds of thousands of
  documents, slow beyond; it is off by default.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from ..config import DataConfig
from ..errors import DataError
from . import packing
from .clean import _select_documents, _split, _Tally
from .sources import Source, _as_list, _count_replace, _is_texts, _read_sources, _resolve

log = logging.getLogger("lora_dapt")


_TOKENIZE_BATCH = 256  # documents per tokenizer call (parts are <= 1M chars, so <= ~256 MB per batch)


_PACK_BATCH = 2048  # pieces (<= seq_len tokens each) per packing batch


_EVAL_DOCS_CHARS = 5_000_000  # cap on Corpus.eval_documents


_VERSION = "2"  # bump when the output of the pipeline changes for the same inputs


_PIECE_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "doc": datasets.Value("int64"),
        "cut": datasets.Value("bool"),  # the document was cut into several pieces (gap filling may cut more)
    }
)


_BLOCK_COLUMNS = ("input_ids", "position_ids", "labels")


# Problem kinds that concern files or rows (not documents dropped by cleaning), with a readable label.
_PROBLEMS = {
    "not_found": "sources that matched no file",
    "unknown_extension": "files with an unknown extension (skipped)",
    "binary": "binary files (skipped)",
    "unreadable": "unreadable files (skipped)",
    "bad_rows": "rows without a usable text field (skipped)",
    "hidden": "hidden files/directories (skipped)",
    "undecodable": "files with undecodable bytes (replaced by U+FFFD, kept)",
    "split": "documents longer than 1M characters (cut into parts, kept)",
}


_DROPS = {
    "empty": "empty",
    "too_short": "shorter than min_chars",
    "duplicate": "exact duplicates",
    "near_duplicate": "near duplicates",
    "in_eval": "identical to an eval document",
}


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
    """Training tokens from replay_sources (special tokens included)."""
    replay_fraction: float = 0.0
    """replay_tokens / train_tokens, as achieved."""
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
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.eval_tokens

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
                ex = ", ".join(self.examples.get(k, [])[:3])
                lines.append(f"  dropped {_DROPS.get(k, k)}: {n}" + (f" (e.g. {ex})" if ex else ""))
        if self.normalized:
            lines.append(f"  normalised: {self.normalized}")
        for k, n in self.problems.items():
            if n:
                ex = ", ".join(self.examples.get(k, [])[:3])
                lines.append(f"{_PROBLEMS.get(k, k)}: {n}" + (f" (e.g. {ex})" if ex else ""))
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


codecs.register_error("lora_dapt_replace", _count_replace)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (fast tokenizers through their Rust backend)."""
    if getattr(tokenizer, "is_fast", False):
        return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pieces_table(
    ids_list: list[list[int]],
    parts: list[int],
    lasts: list[bool],
    idx: Sequence[int],
    seq_len: int,
    bos: int | None,
    eos: int | None,
) -> pa.Table:
    """Documents' token ids -> pieces of at most seq_len tokens, special tokens added by hand so counts are
    exact (BOS on a document's first part, EOS on its last)."""
    # Build the Arrow columns from one flat numpy buffer: converting millions of Python ints list by list
    # into Arrow was ~10% of prepare_corpus.
    lengths = [len(ids) for ids in ids_list]
    flat = np.fromiter(itertools.chain.from_iterable(ids_list), dtype=np.int32, count=sum(lengths))
    doc_lens = np.asarray(lengths, dtype=np.int64)
    first = np.asarray([bos is not None and part == 0 for part in parts], dtype=bool)
    final = np.asarray([eos is not None and bool(last) for last in lasts], dtype=bool)
    doc_lens = doc_lens + first + final
    total = int(doc_lens.sum())
    out = np.empty(total, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]]).astype(np.int64)
    src = 0
    for k, n in enumerate(lengths):
        o = starts[k]
        if first[k]:
            out[o] = bos
            o += 1
        out[o : o + n] = flat[src : src + n]
        src += n
        if final[k]:
            out[o + n] = eos
    # cut every document into pieces of at most seq_len tokens
    piece_lens, piece_docs, piece_cut = [], [], []
    for k, n in enumerate(doc_lens.tolist()):
        for s in range(0, n, seq_len):
            piece_lens.append(min(seq_len, n - s))
            piece_docs.append(idx[k])
            piece_cut.append(n > seq_len)
    # documents lie in order in `out`, so consecutive pieces tile it and their lengths give the offsets
    plen = np.asarray(piece_lens, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(plen)]).astype(np.int32)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(out))
    return pa.table(
        {
            "input_ids": input_ids,
            "length": pa.array(plen, type=pa.int32()),
            "doc": pa.array(np.asarray(piece_docs, dtype=np.int64)),
            "cut": pa.array(piece_cut, type=pa.bool_()),
        }
    )


def _tokenize_batch(
    batch: dict[str, list[Any]],
    idx: list[int],
    tokenizer: Any,
    seq_len: int,
    bos: int | None,
    eos: int | None,
) -> pa.Table:
    """``datasets.map`` function (slow tokenizers): documents -> pieces."""
    ids_list = _encode(tokenizer, batch["text"])
    return _pieces_table(ids_list, batch["part"], batch["last"], idx, seq_len, bos, eos)


_GAP_CUTS = [0]  # cuts made by packing to fill block gaps, counted by _pack_batch for _pack (one process)


def _pack_batch(batch: Any, seq_len: int, pad_id: int) -> dict[str, Any]:
    # The batch is an Arrow table: the pieces are cut out of the flat token buffer as numpy views, without
    # turning millions of token ids into Python ints and back.
    col = batch.column("input_ids").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False)
    offsets = col.offsets.to_numpy()
    pieces = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    splittable = batch.column("cut").to_pylist()
    ids, pos, lab, _, cuts = packing._pack_arrays(pieces, seq_len, pad_id, splittable=splittable)
    _GAP_CUTS[0] += cuts
    return {
        "input_ids": ids.astype(np.int32),
        "position_ids": pos.astype(np.int32),
        "labels": lab.astype(np.int32),
    }


def _block_features() -> datasets.Features:
    return datasets.Features({c: datasets.Sequence(datasets.Value("int32")) for c in _BLOCK_COLUMNS})


def _tokenize(
    docs: datasets.Dataset,
    tokenizer: Any,
    cfg: DataConfig,
    bos: int | None,
    eos: int | None,
    path: Path,
    desc: str,
) -> datasets.Dataset:
    """Documents -> an Arrow file of pieces (``input_ids``, ``length``, ``doc``: the row in ``docs``)."""
    if getattr(tokenizer, "is_fast", False):
        return _tokenize_fast(docs, tokenizer, cfg.seq_len, bos, eos, path, desc)
    # a Python tokenizer: datasets.map with num_proc processes
    return docs.map(
        _tokenize_batch,
        with_indices=True,
        batched=True,
        batch_size=_TOKENIZE_BATCH,
        remove_columns=docs.column_names,
        fn_kwargs={"tokenizer": tokenizer, "seq_len": cfg.seq_len, "bos": bos, "eos": eos},
        features=_PIECE_FEATURES,
        num_proc=cfg.num_proc if cfg.num_proc > 1 and len(docs) >= 64 else None,
        cache_file_name=str(path),
        new_fingerprint=_sha(str(path))[:16],
        desc=desc,
    )


def _tokenize_fast(
    docs: datasets.Dataset,
    tokenizer: Any,
    seq_len: int,
    bos: int | None,
    eos: int | None,
    path: Path,
    desc: str,
) -> datasets.Dataset:
    """A fast tokenizer encodes the next batch in a worker thread (Rust releases the GIL and spreads a batch
    over every core) while this thread turns the previous batch into pieces and writes them: the Python
    work hides behind the tokenizer instead of adding to it."""
    from concurrent.futures import ThreadPoolExecutor

    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    cols = docs.select_columns(["text", "part", "last"])
    with (
        ThreadPoolExecutor(1, thread_name_prefix="lora_dapt-tokenize") as pool,
        ArrowWriter(features=_PIECE_FEATURES, path=str(path)) as writer,
        tqdm(total=len(cols), desc=desc, unit="doc", disable=len(cols) < 1000) as bar,
    ):
        pending = None
        start = 0

        def flush(job: tuple[Any, dict[str, list[Any]], int]) -> None:
            future, batch, first = job
            n = len(batch["part"])
            table = _pieces_table(
                future.result(), batch["part"], batch["last"], range(first, first + n), seq_len, bos, eos
            )
            writer.write_table(table)  # ArrowWriter casts to _PIECE_FEATURES itself
            bar.update(n)

        for batch in cols.iter(batch_size=_TOKENIZE_BATCH):
            future = pool.submit(_encode, tokenizer, batch.pop("text"))
            if pending is not None:
                flush(pending)
            pending = (future, batch, start)
            start += len(batch["part"])
        if pending is not None:
            flush(pending)
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def _pack(
    pieces: datasets.Dataset, seq_len: int, pad_id: int, path: Path, desc: str
) -> tuple[datasets.Dataset, int]:
    """Pieces -> blocks; also returns the cuts made to fill gaps. One process: packing is numpy work on small
    batches, one output file keeps the cache simple, and the cut count is kept in this process."""
    _GAP_CUTS[0] = 0
    blocks = (
        pieces.with_format("arrow")
        .map(
            _pack_batch,
            batched=True,
            batch_size=_PACK_BATCH,
            remove_columns=pieces.column_names,
            fn_kwargs={"seq_len": seq_len, "pad_id": pad_id},
            features=_block_features(),
            cache_file_name=str(path),
            new_fingerprint=_sha(str(path))[:16],
            desc=desc,
        )
        .with_format(None)
    )
    return blocks, _GAP_CUTS[0]


def _lengths(pieces: datasets.Dataset) -> np.ndarray:
    return np.asarray(pieces.data.column("length").to_numpy(), dtype=np.int64)


def _select_replay(pieces: datasets.Dataset, target: int) -> tuple[datasets.Dataset, int, int]:
    """The first pieces (in the seeded replay order) up to ``target`` tokens, the last one cut to fit.

    Returns (pieces, tokens, documents touched).
    """
    lengths = _lengths(pieces)
    docs = np.asarray(pieces.data.column("doc").to_numpy())
    cum = np.cumsum(lengths)
    if len(cum) == 0 or cum[-1] <= target:
        return pieces, int(cum[-1]) if len(cum) else 0, len(np.unique(docs))
    k = int(np.searchsorted(cum, target, side="left"))  # pieces[0..k] reach the target
    chosen = pieces.select(range(k + 1))
    over = int(cum[k] - target)
    if over:
        row = chosen[k]
        last = row["input_ids"][: int(lengths[k]) - over]
        tail = datasets.Dataset.from_dict(
            {"input_ids": [last], "length": [len(last)], "doc": [row["doc"]], "cut": [row["cut"]]},
            features=_PIECE_FEATURES,
        )
        chosen = datasets.concatenate_datasets([chosen.select(range(k)), tail]) if k else tail
    return chosen, target, len(np.unique(docs[: k + 1]))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _describe(sources: Sequence[Any]) -> list[Any] | None:
    """A cache-key description of the sources, or None when one cannot be fingerprinted."""
    out: list[Any] = []
    for src in sources:
        if isinstance(src, (str, os.PathLike)):
            files, _ = _resolve(str(src))
            stamps = []
            for f in files:
                try:
                    st = os.stat(f)
                    stamps.append((f, st.st_size, st.st_mtime_ns))
                except OSError:
                    stamps.append((f, None, None))
            out.append(["path", str(src), stamps])
        elif isinstance(src, datasets.Dataset):
            out.append(["dataset", src._fingerprint])
        elif _is_texts(src):
            h = hashlib.sha256()
            for s in src:
                h.update(hashlib.sha256(s.encode("utf-8", "surrogatepass")).digest())
            out.append(["texts", h.hexdigest()])
        else:
            return None
    return out


def _tokenizer_key(tokenizer: Any) -> str:
    if getattr(tokenizer, "is_fast", False):
        return _sha(tokenizer.backend_tokenizer.to_str())
    from datasets.fingerprint import Hasher

    return Hasher.hash(tokenizer)


def resolve_special_tokens(tokenizer: Any, cfg: DataConfig) -> tuple[int | None, int | None]:
    """(BOS id or None, EOS id or None) to put around each document.

    BOS: ``add_bos`` True -> always (an error if the tokenizer has none); None -> only when the tokenizer
    adds it by itself (Llama, Gemma, Mistral do; GPT-2, Qwen, SmolLM do not). EOS: when ``add_eos`` and the
    tokenizer has one (a warning otherwise).
    """
    bos_id = tokenizer.bos_token_id
    if cfg.add_bos is True and bos_id is None:
        raise DataError(
            "data.add_bos = true but the tokenizer has no BOS token: set data.add_bos to null or false"
        )
    if cfg.add_bos is None:
        try:
            probe = tokenizer("x").input_ids
        except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "x" adds nothing we can see
            probe = []
        use_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
    else:
        use_bos = cfg.add_bos
    eos_id = tokenizer.eos_token_id
    if cfg.add_eos and eos_id is None:
        log.warning("the tokenizer has no EOS token: documents are packed without an end marker")
    return (bos_id if use_bos else None), (eos_id if cfg.add_eos else None)


def _short(sources: Sequence[Any]) -> str:
    names = [str(s) if isinstance(s, (str, os.PathLike)) else type(s).__name__ for s in sources[:3]]
    return ", ".join(names) + (f" (+{len(sources) - 3} more)" if len(sources) > 3 else "")


def _problem_text(stats: CorpusStats) -> str:
    parts = [f"{stats.files_read} files read", f"{stats.documents_read} documents"]
    parts += [f"{n} {_DROPS.get(k, k)}" for k, n in stats.dropped.items() if n]
    parts += [
        f"{n} {_PROBLEMS.get(k, k)}"
        + (f" ({', '.join(stats.examples.get(k, [])[:3])})" if stats.examples.get(k) else "")
        for k, n in stats.problems.items()
        if n
    ]
    return "; ".join(parts)


def prepare_corpus(
    sources: Source | Sequence[Source] | None,
    tokenizer: Any,
    config: DataConfig | None = None,
    *,
    eval_sources: Source | Sequence[Source] | None = None,
    replay_sources: Source | Sequence[Source] | None = None,
    use_cache: bool = True,
) -> Corpus:
    """Read, clean, split, tokenize and pack a domain corpus (see the module docstring for the trade-offs).

    Args:
        sources: paths, globs, directories (recursive), ``datasets.Dataset``/``IterableDataset`` objects, or
            lists of document texts; a single one or a list of them. A plain ``list[str]`` is read as PATHS
            (like ``DataConfig.sources``); to pass texts, nest them: ``[["doc one", "doc two"]]``, or use
            ``datasets.Dataset.from_dict({"text": texts})``. None: ``config.sources``.
        tokenizer: a transformers tokenizer (fast ones are used through their Rust backend).
        config: cleaning, split, packing and replay settings (default ``DataConfig()``).
        eval_sources, replay_sources: override ``config.eval_sources``/``config.replay_sources`` (same forms
            as ``sources``, so datasets and texts work too).
        use_cache: load the result from ``cache_dir`` when the same inputs were prepared before.

    Raises:
        DataError: no document left, or a source of an unsupported type; the message lists what was read
            and dropped.
    """
    t0 = time.perf_counter()
    cfg = config or DataConfig()
    src = _as_list(sources) if sources is not None else list(cfg.sources)
    ev_src = _as_list(eval_sources) if eval_sources is not None else list(cfg.eval_sources)
    rp_src = _as_list(replay_sources) if replay_sources is not None else list(cfg.replay_sources)
    if not src:
        raise DataError("no sources given: pass files, globs, directories or datasets (data.sources)")
    if cfg.replay_fraction > 0 and not rp_src:
        raise DataError(f"replay_fraction = {cfg.replay_fraction} but no replay sources: give replay_sources")
    bos, eos = resolve_special_tokens(tokenizer, cfg)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None), 0)

    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    root = root / "lora_dapt-corpus"
    described = [_describe(s) for s in (src, ev_src, rp_src)]
    key = None
    if all(d is not None for d in described):
        settings = {
            k: v
            for k, v in cfg.to_dict().items()
            if k not in ("num_proc", "cache_dir", "sources", "eval_sources", "replay_sources")
        }
        blob = json.dumps(
            [_VERSION, described, settings, _tokenizer_key(tokenizer), bos, eos, pad_id], default=str
        )
        key = _sha(blob)[:24]
        final = root / key
        if use_cache and (final / "stats.json").is_file():
            return _load_cached(final, t0)
    else:
        log.info("an IterableDataset source cannot be fingerprinted: the prepared corpus is not cached")

    root.mkdir(parents=True, exist_ok=True)
    work = Path(root / f"tmp-{key or 'nocache'}-{os.getpid()}-{time.time_ns()}")
    work.mkdir(parents=True)
    try:
        corpus = _build(src, ev_src, rp_src, tokenizer, cfg, bos, eos, pad_id, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    corpus.stats.seconds = time.perf_counter() - t0
    if key is None:  # not cacheable: keep the work dir (the datasets live there) under a unique name
        corpus.stats.cache_path = str(work)
        (work / "stats.json").write_text(json.dumps(corpus.stats.to_dict(), indent=1))
        log.info(corpus.stats.log_line())
        return corpus
    final = root / key
    corpus.stats.cache_path = str(final)
    (work / "stats.json").write_text(json.dumps(corpus.stats.to_dict(), indent=1))
    (work / "eval_documents.json").write_text(json.dumps(corpus.eval_documents))
    for p in work.iterdir():  # keep only the blocks and the reports
        if p.name not in ("train.arrow", "eval.arrow", "stats.json", "eval_documents.json"):
            p.unlink()
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(work, final)
    except OSError:  # another process stored the same corpus meanwhile: use theirs
        shutil.rmtree(work, ignore_errors=True)
    out = _load_cached(final, t0, announce=False)
    out.stats.cached = False
    out.stats.seconds = corpus.stats.seconds
    log.info(out.stats.log_line())
    return out


def _load_cached(final: Path, t0: float, announce: bool = True) -> Corpus:
    stats = CorpusStats.from_dict(json.loads((final / "stats.json").read_text()))
    train = datasets.Dataset.from_file(str(final / "train.arrow"))
    ev = datasets.Dataset.from_file(str(final / "eval.arrow")) if (final / "eval.arrow").is_file() else None
    docs_path = final / "eval_documents.json"
    eval_docs = json.loads(docs_path.read_text()) if docs_path.is_file() else []
    stats.cached = True
    stats.seconds = time.perf_counter() - t0
    stats.cache_path = str(final)
    if announce:
        log.info(stats.log_line())
    return Corpus(train=train, eval=ev, stats=stats, eval_documents=eval_docs)


def _build(
    src: list[Any],
    ev_src: list[Any],
    rp_src: list[Any],
    tokenizer: Any,
    cfg: DataConfig,
    bos: int | None,
    eos: int | None,
    pad_id: int,
    work: Path,
) -> Corpus:
    tally = _Tally()
    stats = CorpusStats(seq_len=cfg.seq_len, add_bos=bos is not None, add_eos=eos is not None)

    # 1. read + clean + split (by document)
    docs = _read_sources(src, cfg.text_field, cfg.normalize, work, "domain", cfg.num_proc)
    if ev_src:
        ev_docs = _read_sources(ev_src, cfg.text_field, cfg.normalize, work, "eval", cfg.num_proc)
        ev_idx, n_ev_read = _select_documents(ev_docs, cfg, tally)
        ev_hashes = set(ev_docs.data.column("hash").take(ev_idx).to_pylist()) if ev_idx else set()
        train_idx, n_read = _select_documents(docs, cfg, tally, drop_hashes=ev_hashes)
        n_read += n_ev_read
        train_docs, eval_docs = docs.select(train_idx), ev_docs.select(ev_idx)
    else:
        kept, n_read = _select_documents(docs, cfg, tally)
        train_idx, ev_idx = _split(docs, kept, cfg.eval_fraction, cfg.seed)
        train_docs, eval_docs = docs.select(train_idx), docs.select(ev_idx)
    stats.files_read = tally.counts.pop("file_read", 0)
    tally.examples.pop("file_read", None)
    stats.normalized = tally.counts.pop("normalized", 0)
    stats.documents_read = n_read
    stats.documents_kept = len(train_docs) + len(eval_docs)
    stats.dropped = {k: tally.counts.get(k, 0) for k in _DROPS}
    stats.problems = {k: n for k, n in tally.counts.items() if k not in _DROPS}
    stats.examples = {k: v for k, v in tally.examples.items() if v}
    for k, n in stats.problems.items():
        log.warning("%d %s, e.g. %s", n, _PROBLEMS.get(k, k), ", ".join(stats.examples.get(k, [])[:3]))
    if len(train_docs) == 0:
        if stats.files_read == 0 and stats.documents_read == 0 and not stats.problems.get("bad_rows"):
            raise DataError(
                f"no training documents: the sources {_short(src)} matched no readable file or row "
                f"({_problem_text(stats)}). Check the paths and globs (directories are searched recursively "
                "for .txt .md .rst .jsonl .json .parquet .csv)"
            )
        raise DataError(
            f"no training documents left after cleaning: {_problem_text(stats)}. Check the sources and "
            "text_field, or relax min_chars / dedupe"
        )
    stats.train_documents, stats.eval_documents = len(train_docs), len(eval_docs)
    chars = np.asarray(docs.data.column("chars").to_numpy())
    ev_chars = np.asarray(ev_docs.data.column("chars").to_numpy()) if ev_src else chars
    stats.characters = int(chars[train_idx].sum() + (ev_chars[ev_idx].sum() if ev_idx else 0))

    # 2. tokenize into pieces of <= seq_len
    train_pieces = _tokenize(
        train_docs, tokenizer, cfg, bos, eos, work / "train-pieces.arrow", "tokenizing train"
    )
    eval_pieces = (
        _tokenize(eval_docs, tokenizer, cfg, bos, eos, work / "eval-pieces.arrow", "tokenizing eval")
        if len(eval_docs)
        else None
    )
    specials = (bos is not None) + (eos is not None)
    domain_tokens = int(_lengths(train_pieces).sum())
    eval_tokens = int(_lengths(eval_pieces).sum()) if eval_pieces is not None else 0
    n_pieces = len(train_pieces) + (len(eval_pieces) if eval_pieces is not None else 0)
    text_tokens = domain_tokens + eval_tokens - specials * stats.documents_kept
    stats.special_tokens = specials * stats.documents_kept
    stats.tokens_per_char = text_tokens / stats.characters if stats.characters else 0.0
    stats.continuation_pieces = n_pieces - stats.documents_kept

    # 3. replay: general text, a seeded sample of whole documents (the last one cut to fit the token budget)
    if cfg.replay_fraction > 0:
        rp_docs = _read_sources(rp_src, cfg.text_field, cfg.normalize, work, "replay", cfg.num_proc)
        rp_tally = _Tally()
        rp_idx, _ = _select_documents(rp_docs, cfg.replace(min_chars=1, near_dedupe=False), rp_tally)
        random.Random(cfg.seed + 1).shuffle(rp_idx)
        target = math.ceil(domain_tokens * cfg.replay_fraction / (1 - cfg.replay_fraction))
        # tokenize only about as many characters as the budget needs (x1.5 + 64 documents of margin)
        chars = np.asarray(rp_docs.data.column("chars").to_numpy())[rp_idx] if rp_idx else np.zeros(0)
        budget = target / max(stats.tokens_per_char, 1e-3) * 1.5
        n_take = min(len(rp_idx), int(np.searchsorted(np.cumsum(chars), budget)) + 64)
        rp_sel = rp_docs.select(rp_idx[:n_take])
        rp_pieces = _tokenize(
            rp_sel, tokenizer, cfg, bos, eos, work / "replay-pieces.arrow", "tokenizing replay"
        )
        rp_pieces, got, n_docs = _select_replay(rp_pieces, target)
        if got < target:
            log.warning(
                "replay sources hold %d tokens, fewer than the %d asked for (replay_fraction %.3f): all used",
                got,
                target,
                cfg.replay_fraction,
            )
        stats.replay_tokens, stats.replay_documents = got, n_docs
        stats.special_tokens += specials * n_docs
        train_pieces = datasets.concatenate_datasets([train_pieces, rp_pieces])

    # 4. pack
    train, cuts = _pack(train_pieces, cfg.seq_len, pad_id, work / "train.arrow", "packing train")
    ev = None
    if eval_pieces is not None:
        ev, ev_cuts = _pack(eval_pieces, cfg.seq_len, pad_id, work / "eval.arrow", "packing eval")
        cuts += ev_cuts
    stats.gap_fill_cuts = cuts
    stats.train_tokens = domain_tokens + stats.replay_tokens
    stats.eval_tokens = eval_tokens
    stats.train_blocks, stats.eval_blocks = len(train), (len(ev) if ev is not None else 0)
    total = (stats.train_blocks + stats.eval_blocks) * cfg.seq_len
    stats.padding_tokens = total - stats.train_tokens - stats.eval_tokens
    stats.padding_fraction = stats.padding_tokens / total if total else 0.0
    stats.replay_fraction = stats.replay_tokens / stats.train_tokens if stats.train_tokens else 0.0

    eval_texts: list[str] = []
    n_chars = 0
    # iterate (not .data): the split is a selection of rows, .data would be the whole table
    for batch in eval_docs.select_columns(["text"]).iter(batch_size=256) if len(eval_docs) else []:
        for text in batch["text"]:
            if n_chars + len(text) > _EVAL_DOCS_CHARS and eval_texts:
                break
            eval_texts.append(text)
            n_chars += len(text)
        if n_chars >= _EVAL_DOCS_CHARS:
            break
    return Corpus(train=train, eval=ev, stats=stats, eval_documents=eval_texts)
