"""Raw text -> cleaned documents -> train/eval split by document -> packed token blocks.

:func:`prepare_corpus` reads files, globs, directories, ``datasets`` datasets or in-memory texts, cleans and
de-duplicates them, holds out whole documents for evaluation, mixes in general-domain "replay" text, tokenizes
and packs with :mod:`lora_dapt.data.packing`. It returns a :class:`Corpus` whose ``train``/``eval`` rows are
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
  inputs load the stored blocks instead of recomputing them. An in-memory ``IterableDataset`` cannot be
  fingerprinted, so a corpus built from one is not cached; a datasets spec (streaming or not) is keyed by
  the spec and its local files' stamps (:mod:`.hf`), so it is.
* Mixing: ``data.mixture`` components (or the replay short form) at their token fractions, by
  :mod:`.mixture` (the first component is the domain and holds the eval split; a short component limits
  the others, said in the log and the stats).
* Where each step lives: :mod:`.sources` (resolving and reading sources into a documents table; datasets
  specs: :mod:`.specs`, :mod:`.hf`), :mod:`.mixture` (components and their fractions),
  :mod:`.clean` (filters, de-duplication, the split), :mod:`.pieces` (tokenizing, packing, replay
  selection), :mod:`.stats` (:class:`Corpus`, :class:`CorpusStats`); this module orchestrates and caches.
* Near-duplicate removal (MinHash LSH) is a sequential Python pass: fine for hundreds of thousands of
  documents, slow beyond; it is off by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .clean import _select_documents, _split, _Tally
from .hf import describe_spec
from .mixture import Component, mix_components, plan_components
from .pieces import pack_pieces, piece_lengths, tokenize_documents
from .sources import Source, as_source_list, is_texts, read_documents, resolve_path
from .specs import is_spec, parse_spec
from .stats import DROPS, PROBLEMS, Corpus, CorpusStats, format_stats

__all__ = ["Corpus", "CorpusStats", "format_stats", "prepare_corpus", "resolve_special_tokens"]

log = logging.getLogger("lora_dapt")


_EVAL_DOCS_CHARS = 5_000_000  # cap on Corpus.eval_documents


_VERSION = "5"  # bump when the output of the pipeline changes for the same inputs (4: blocks carry bytes;
# 5: mixture stats, replay cleaned like the domain)


_CACHED_FILES = ("train.arrow", "eval.arrow", "stats.json", "eval_documents.json")


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
        sources: paths, globs, directories (recursive), datasets spec mappings (``{"hf": "data/dir",
            "streaming": True}``, :mod:`.specs`), ``datasets.Dataset``/``IterableDataset`` objects, or
            lists of document texts; a single one or a list of them. A plain ``list[str]`` is read as PATHS
            (like ``DataConfig.sources``); to pass texts, nest them: ``[["doc one", "doc two"]]``, or use
            ``datasets.Dataset.from_dict({"text": texts})``. None (or empty): ``config.sources``, or the
            components of ``config.mixture`` (:mod:`.mixture`: fractions, shortfalls, eval).
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
    ev_src = as_source_list(eval_sources) if eval_sources is not None else list(cfg.eval_sources)
    # an empty sources list is "none given" (what run() passes for a config with data.mixture)
    components = plan_components(sources if as_source_list(sources) else None, replay_sources, cfg)
    src = components[0].sources
    bos, eos = resolve_special_tokens(tokenizer, cfg)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None), 0)

    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    root = root / "lora_dapt-corpus"
    key = _cache_key(components, ev_src, tokenizer, cfg, bos, eos, pad_id)
    if key is None:
        log.info("an IterableDataset source cannot be fingerprinted: the prepared corpus is not cached")
    elif use_cache and (root / key / "stats.json").is_file():
        return _load_cached(root / key, t0)

    with _work_dir(root, key) as work:
        stats = CorpusStats(seq_len=cfg.seq_len, add_bos=bos is not None, add_eos=eos is not None)
        # 1. read every source into a table of documents and report rows
        docs = read_documents(src, cfg, work, "domain")
        ev_docs = read_documents(ev_src, cfg, work, "eval") if ev_src else None
        # 2. clean (filters, de-duplication) and split by document
        train_docs, eval_docs = _clean_and_split(docs, ev_docs, cfg, stats)
        if len(train_docs) == 0:
            raise _no_documents(stats, src)
        if ev_docs is not None and len(eval_docs) == 0:
            names = ", ".join(_source_name(s) for s in ev_src[:3])
            raise DataError(
                f"data.eval_sources ({names}) hold no usable document ({stats.what_happened()}): check the "
                "paths, or leave eval_sources empty to hold out data.eval_fraction of the sources"
            )
        # 3. tokenize into pieces of <= seq_len tokens
        train_pieces = tokenize_documents(
            train_docs, tokenizer, cfg, bos, eos, work / "train-pieces.arrow", "tokenizing train"
        )
        eval_pieces = (
            tokenize_documents(
                eval_docs, tokenizer, cfg, bos, eos, work / "eval-pieces.arrow", "tokenizing eval"
            )
            if len(eval_docs)
            else None
        )
        _count_tokens(stats, train_pieces, eval_pieces)
        # 4. the mix: replay or other components at their fractions, seeded samples of whole documents
        if len(components) > 1:
            train_pieces = mix_components(
                train_pieces, components, eval_docs, tokenizer, cfg, (bos, eos), work, stats
            )
        # 5. pack
        train, cuts = pack_pieces(train_pieces, cfg.seq_len, pad_id, work / "train.arrow", "packing train")
        ev, ev_cuts = (
            pack_pieces(eval_pieces, cfg.seq_len, pad_id, work / "eval.arrow", "packing eval")
            if eval_pieces is not None
            else (None, 0)
        )
        _count_blocks(stats, train, ev, cuts + ev_cuts)
        corpus = Corpus(train=train, eval=ev, stats=stats, eval_documents=_eval_texts(eval_docs))
    stats.seconds = time.perf_counter() - t0
    # 6. cache
    return _store(corpus, work, root / key if key else None, t0)


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


# ---------------------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------------------


def _column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """A numeric column of the table under ``ds`` (all its rows, ignoring any selection)."""
    return np.asarray(ds.data.column(name).to_numpy())


def _specials(stats: CorpusStats) -> int:
    """Special tokens around each document (BOS and/or EOS)."""
    return int(stats.add_bos) + int(stats.add_eos)


def _clean_and_split(
    docs: datasets.Dataset, ev_docs: datasets.Dataset | None, cfg: DataConfig, stats: CorpusStats
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The kept training and eval documents; counts what was read, dropped and reported into ``stats``.

    With ``ev_docs`` (eval_sources) they are the eval split, and training documents identical to one of
    them are dropped; otherwise whole documents of ``docs`` are held out by a seeded shuffle.
    """
    tally = _Tally()
    if ev_docs is not None:
        ev_idx, n_ev_read = _select_documents(ev_docs, cfg, tally)
        ev_hashes = set(ev_docs.data.column("hash").take(ev_idx).to_pylist()) if ev_idx else set()
        train_idx, n_read = _select_documents(docs, cfg, tally, drop_hashes=ev_hashes)
        n_read += n_ev_read
        ev_table = ev_docs
    else:
        kept, n_read = _select_documents(docs, cfg, tally)
        train_idx, ev_idx = _split(docs, kept, cfg.eval_fraction, cfg.seed)
        ev_table = docs
    stats.files_read = tally.counts.pop("file_read", 0)
    tally.examples.pop("file_read", None)
    stats.normalized = tally.counts.pop("normalized", 0)
    stats.documents_read = n_read
    stats.documents_kept = len(train_idx) + len(ev_idx)
    stats.train_documents, stats.eval_documents = len(train_idx), len(ev_idx)
    stats.dropped = {k: tally.counts.get(k, 0) for k in DROPS}
    stats.problems = {k: n for k, n in tally.counts.items() if k not in DROPS}
    stats.examples = {k: v for k, v in tally.examples.items() if v}
    for k, n in stats.problems.items():
        log.warning("%d %s, e.g. %s", n, PROBLEMS.get(k, k), stats.examples_of(k))
    ev_chars = _column(ev_table, "chars")[ev_idx].sum() if ev_idx else 0
    stats.characters = int(_column(docs, "chars")[train_idx].sum() + ev_chars)
    return docs.select(train_idx), ev_table.select(ev_idx)


def _no_documents(stats: CorpusStats, src: Sequence[Any]) -> DataError:
    rows = stats.problems.get("bad_rows") or stats.problems.get("invalid_json")
    if stats.files_read == 0 and stats.documents_read == 0 and not rows:
        names = [_source_name(s) for s in src[:3]]
        more = f" (+{len(src) - 3} more)" if len(src) > 3 else ""
        return DataError(
            f"no training documents: the sources {', '.join(names)}{more} matched no readable file or row "
            f"({stats.what_happened()}). Check the paths and globs (directories are searched recursively "
            "for .txt .md .rst .jsonl .json .parquet .csv, source code and markup; data.extensions adds "
            "others)" + _texts_hint(src)
        )
    return DataError(
        f"no training documents left after cleaning: {stats.what_happened()}. Check the sources and "
        "text_field, or relax min_chars / dedupe"
    )


def _source_name(src: Any) -> str:
    if not isinstance(src, (str, os.PathLike)):
        return type(src).__name__
    name = str(src)
    return name if len(name) <= 80 else f"{name[:80]!r}... ({len(name):,} characters)"


def _texts_hint(src: Sequence[Any]) -> str:
    """A hint when path sources look like document texts (a str in the sources list is a path)."""
    paths = [str(s) for s in src if isinstance(s, str)]
    if not any("\n" in p or len(p) > 255 or " " in p.strip() for p in paths):
        return ""
    return (
        ". The sources look like document texts: a string in the sources list is read as a PATH; to pass "
        'texts, nest them in a list of their own: prepare_corpus([["doc one", "doc two"]], tok), or use '
        'datasets.Dataset.from_dict({"text": texts})'
    )


def _count_tokens(
    stats: CorpusStats, train_pieces: datasets.Dataset, eval_pieces: datasets.Dataset | None
) -> None:
    """Token counts of the domain pieces (replay not yet added): tokens, special tokens, tokens per char."""
    specials = _specials(stats) * stats.documents_kept
    stats.train_tokens = int(piece_lengths(train_pieces).sum())
    stats.eval_tokens = int(piece_lengths(eval_pieces).sum()) if eval_pieces is not None else 0
    n_pieces = len(train_pieces) + (len(eval_pieces) if eval_pieces is not None else 0)
    stats.special_tokens = specials
    text_tokens = stats.train_tokens + stats.eval_tokens - specials
    stats.tokens_per_char = text_tokens / stats.characters if stats.characters else 0.0
    stats.continuation_pieces = n_pieces - stats.documents_kept


def _count_blocks(
    stats: CorpusStats, train: datasets.Dataset, ev: datasets.Dataset | None, cuts: int
) -> None:
    stats.gap_fill_cuts = cuts
    stats.train_blocks, stats.eval_blocks = len(train), (len(ev) if ev is not None else 0)
    total = (stats.train_blocks + stats.eval_blocks) * stats.seq_len
    stats.padding_tokens = total - stats.train_tokens - stats.eval_tokens
    stats.padding_fraction = stats.padding_tokens / total if total else 0.0
    stats.replay_fraction = stats.replay_tokens / stats.train_tokens if stats.train_tokens else 0.0


def _eval_texts(eval_docs: datasets.Dataset) -> list[str]:
    """The eval documents' texts, up to about _EVAL_DOCS_CHARS characters."""
    texts: list[str] = []
    n_chars = 0
    # iterate (not .data): the split is a selection of rows, .data would be the whole table
    for batch in eval_docs.select_columns(["text"]).iter(batch_size=256) if len(eval_docs) else []:
        for text in batch["text"]:
            if n_chars + len(text) > _EVAL_DOCS_CHARS and texts:
                break
            texts.append(text)
            n_chars += len(text)
        if n_chars >= _EVAL_DOCS_CHARS:
            break
    return texts


# ---------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_key(
    components: list[Component],
    ev_src: list[Any],
    tokenizer: Any,
    cfg: DataConfig,
    bos: int | None,
    eos: int | None,
    pad_id: int,
) -> str | None:
    """A hash of everything the output depends on, or None when a source cannot be fingerprinted."""
    described = [_describe(ev_src)] + [_describe(c.sources) for c in components]
    if any(d is None for d in described):
        return None
    described.append([(c.name, c.weight) for c in components])
    settings = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in ("num_proc", "cache_dir", "sources", "eval_sources", "replay_sources", "mixture")
    }
    blob = json.dumps(
        [_VERSION, described, settings, _tokenizer_key(tokenizer), bos, eos, pad_id], default=str
    )
    return _sha(blob)[:24]


def _describe(sources: Sequence[Any]) -> list[Any] | None:
    """A cache-key description of the sources, or None when one cannot be fingerprinted."""
    out: list[Any] = []
    for src in sources:
        if isinstance(src, (str, os.PathLike)):
            stamps = []
            for f in resolve_path(src).files:
                try:
                    st = os.stat(f)
                    stamps.append((f, st.st_size, st.st_mtime_ns))
                except OSError:
                    stamps.append((f, None, None))
            out.append(["path", str(src), stamps])
        elif is_spec(src):
            out.append(describe_spec(parse_spec(src)))
        elif isinstance(src, datasets.Dataset):
            out.append(["dataset", src._fingerprint])
        elif is_texts(src):
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


@contextlib.contextmanager
def _work_dir(root: Path, key: str | None) -> Iterator[Path]:
    """A fresh directory to build in; removed if the build fails (on success :func:`_store` takes it)."""
    root.mkdir(parents=True, exist_ok=True)
    work = Path(root / f"tmp-{key or 'nocache'}-{os.getpid()}-{time.time_ns()}")
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _store(corpus: Corpus, work: Path, final: Path | None, t0: float) -> Corpus:
    """Keep the blocks and the stats under ``final`` and load them from there (the work dir itself when the
    corpus cannot be cached: its datasets live there)."""
    stats = corpus.stats
    stats.cache_path = str(final or work)
    (work / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
    if final is None:
        log.info(stats.log_line())
        return corpus
    (work / "eval_documents.json").write_text(json.dumps(corpus.eval_documents))
    for p in work.iterdir():  # keep only the blocks and the reports
        if p.name not in _CACHED_FILES:
            p.unlink()
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(work, final)
    except OSError:  # another process stored the same corpus meanwhile: use theirs
        shutil.rmtree(work, ignore_errors=True)
    out = _load_cached(final, t0, announce=False)
    out.stats.cached = False
    out.stats.seconds = stats.seconds
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
