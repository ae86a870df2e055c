"""Where the data is: the one resolver of sources, and the documents table the corpus is built from.

What is resolved how:

* A **path, glob or directory** (``str`` or ``os.PathLike``; ``~`` expanded) goes through
  :func:`~lora_dapt.data.resolve.resolve_path` (:mod:`.resolve` says the rules: regular files only,
  symlinks followed with loop detection, each file once by real path). What was not returned comes back as
  :class:`Skipped` (``not_found``, ``hidden``, ``not_regular``, ``symlink_loop``, ``seen_twice``), and each
  caller decides what it means: :func:`read_documents` (the corpus) makes report rows of them,
  :func:`read_text_sources` and the SFT reader raise a ``DataError`` for what they cannot read.
* A **datasets spec** mapping ``{hf: NAME_OR_DIR, split, name, data_files, text_field, streaming}``
  (:mod:`.specs`) is loaded by :mod:`.hf` and read like a dataset; its rows are named ``hf:NAME[split][i]``.
* A **datasets.Dataset / IterableDataset** gives the column ``text_field`` of every row.
* A **list or tuple of strings** nested inside the sources list is in-memory document texts.

Files are read by :mod:`.formats` (one reader per format); which extensions are read, and as text or as a
table, is :func:`~.formats.readable_extensions` of ``DataConfig.extensions`` (prose, source code, markup
and configuration by default); a file of another extension is ``unknown_extension``, one the rules leave
out ``excluded_extension``. :func:`read_documents` streams every document
into one Arrow table next to *report rows* (status != "ok") for what could not be used, so nothing vanishes
silently and counts made in worker processes come back inside the rows: a file's undecodable bytes are a
report row its reader yields, not a counter. Text is UTF-8, or UTF-16/UTF-32 when a byte order mark says
so, in every format; undecodable bytes are counted (``undecodable``) whatever the format, rows that do not
parse are named by line (``invalid_json``; a CSV record, ``bad_rows``), and a table file without rows is
``empty_file``.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import datasets

from ..config import DataConfig
from ..errors import DataError
from .clean import clean_text
from .formats import (
    TABLE_EXTENSIONS,
    TEXT_EXTENSIONS,
    Row,
    Utf8Decoder,
    csv_rows,
    is_binary,
    json_rows,
    jsonl_rows,
    parquet_rows,
    readable_extensions,
    sniff_encoding,
    text_chunks,
)
from .hf import load_spec
from .resolve import Resolved, SkipKind, Skipped, resolve_path
from .specs import is_spec, parse_spec

__all__ = [
    "TABLE_EXTENSIONS",
    "TEXT_EXTENSIONS",
    "ReadOptions",
    "Resolved",
    "SkipKind",
    "Skipped",
    "as_source_list",
    "is_texts",
    "read_documents",
    "read_text_sources",
    "resolve_path",
]

Source = str | os.PathLike | Mapping[str, Any] | datasets.Dataset | datasets.IterableDataset | Sequence[str]
"""A path, glob or directory; a datasets spec mapping; a ``datasets`` dataset; or a list/tuple of texts."""


@dataclass(frozen=True)
class ReadOptions:
    """What reading a file needs from the data config (small and picklable, for worker processes)."""

    text_field: str = "text"
    normalize: bool = True
    text_exts: frozenset[str] = frozenset(TEXT_EXTENSIONS)
    table_exts: frozenset[str] = frozenset(TABLE_EXTENSIONS)

    @classmethod
    def of(cls, cfg: DataConfig) -> ReadOptions:
        text, tables = readable_extensions(cfg.extensions)
        return cls(cfg.text_field, cfg.normalize, text, tables)


def read_text_sources(sources: str | Path | Mapping[str, Any] | Sequence[Any]) -> list[str]:
    """Read text files (prose, code, markup: ``TEXT_EXTENSIONS``) given as paths, directories (searched
    recursively) or globs, one text per file; a datasets spec mapping gives its ``text_field`` column
    (default ``"text"``), one text per row.

    Strict: a source that names no file, a file that is not UTF-8 text, or a spec row without a string text
    raises ``DataError``.

    Example::

        texts = read_text_sources(["notes/*.md", "extra.txt"])
    """
    items = [sources] if isinstance(sources, (str, Path, Mapping)) else list(sources)
    files: list[str] = []
    rows: list[str] = []
    for item in items:
        if is_spec(item):
            rows += _spec_texts(parse_spec(item))
            continue
        found = resolve_path(item, TEXT_EXTENSIONS)
        if found.kind in ("glob", "missing") and not found.files:
            raise DataError(
                f"{item!s}: no such file, directory or matching glob. To score a string itself, pass a "
                "list: perplexity(model, tok, [text])"
            )
        odd = [sk for sk in found.skipped if sk.kind == "not_regular"]
        if odd:
            raise DataError(f"{odd[0].name}: {odd[0].detail}; give regular text files")
        files += found.files
    texts = []
    for f in files:
        decoder = Utf8Decoder()
        try:
            with open(f, "rb") as fh:
                texts.append("".join(text_chunks(fh, decoder)))
        except OSError as e:
            raise DataError(f"{f}: cannot read as UTF-8 text: {e}") from None
        if decoder.replaced:
            raise DataError(
                f"{f}: cannot read as UTF-8 text: {decoder.first_error}; {decoder.replaced} undecodable "
                "sequence(s) in all"
            )
    return texts + rows


def _spec_texts(spec: Any) -> list[str]:
    """The texts of a datasets spec (strict: every row must hold a string ``text_field``)."""
    field_ = spec.text_field or "text"
    out = []
    for i, row in enumerate(load_spec(spec)):
        value = row.get(field_) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{spec.label}[{i}]: no string '{field_}' in the row; set text_field in the spec")
        out.append(value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The documents table (what prepare_corpus reads)
# ---------------------------------------------------------------------------------------------------------------

_PART_CHARS = 1 << 20  # a document longer than this many characters is cut (at a line break) into parts


# Row schema of the documents table; report rows have status != "ok" and no text.
_DOC_FEATURES = datasets.Features(
    {
        "text": datasets.Value("string"),
        "source": datasets.Value("string"),
        "group": datasets.Value("string"),
        "part": datasets.Value("int32"),
        "last": datasets.Value("bool"),
        "status": datasets.Value("string"),
        "note": datasets.Value("string"),
        "count": datasets.Value("int64"),
        "chars": datasets.Value("int64"),
        "hash": datasets.Value("binary"),
    }
)


def _cut_parts(chunks: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Re-chunk a stream of text into parts of about _PART_CHARS, cut at a line break (else a space).

    Yields (part, is_last); holds at most ~2 parts in memory.
    """
    buf = ""
    held: str | None = None
    for chunk in chunks:
        buf += chunk
        while len(buf) >= 2 * _PART_CHARS:
            cut = buf.rfind("\n", _PART_CHARS // 2, _PART_CHARS + 1)
            if cut < 0:
                cut = buf.rfind(" ", _PART_CHARS // 2, _PART_CHARS + 1)
            cut = _PART_CHARS if cut < 0 else cut + 1
            if held is not None:
                yield held, False
            held, buf = buf[:cut], buf[cut:]
    if held is not None:
        yield held, not buf
    if buf or held is None:
        yield buf, True


def _report(source: str, status: str, detail: str = "", count: int = 1) -> dict[str, Any]:
    return {
        "text": "",
        "source": source,
        "group": source,
        "part": 0,
        "last": True,
        "status": status,
        "note": detail,
        "count": count,
        "chars": 0,
        "hash": b"",
    }


def _doc(
    text: str, source: str, group: str, normalize: bool, part: int = 0, last: bool = True
) -> dict[str, Any]:
    cleaned = clean_text(text, normalize)
    return {
        "text": cleaned,
        "source": source,
        "group": group,
        "part": part,
        "last": last,
        "status": "ok",
        "note": "normalized" if cleaned != text else "",
        "count": 1,
        "chars": len(cleaned),
        "hash": hashlib.blake2b(cleaned.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
    }


def _parts_docs(chunks: Iterable[str], source: str, normalize: bool) -> Iterator[dict[str, Any]]:
    """One document from a stream of text, cut into parts (source, source#1, ...) when it is huge."""
    n = 0
    for n, (part, last) in enumerate(_cut_parts(chunks)):  # noqa: B007
        yield _doc(part, source if n == 0 else f"{source}#{n}", source, normalize, n, last)
    if n:
        yield _report(source, "split", f"{n + 1} parts")


def _text_docs(text: str, source: str, normalize: bool) -> Iterable[dict[str, Any]]:
    if len(text) < 2 * _PART_CHARS:  # the common case, without the cutting machinery
        return [_doc(text, source, source, normalize)]
    return _parts_docs([text], source, normalize)


def _text_file_docs(
    f: BinaryIO, path: str, normalize: bool, decoder: Utf8Decoder
) -> Iterator[dict[str, Any]]:
    yield from _parts_docs(text_chunks(f, decoder), path, normalize)


def _row_text(row: Any, text_field: str) -> str | None:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        value = row.get(text_field)
        return value if isinstance(value, str) else None
    return None


def _rows_docs(
    rows: Iterable[tuple[str, Any, str | None]],
    source: str,
    text_field: str,
    normalize: bool,
    parse_kind: str = "invalid_json",
) -> Iterator[dict[str, Any]]:
    """Documents of (name, row, parse error) triples; the rows without a string ``text_field`` as one report
    row (``bad_rows``), the rows that did not parse as another (``parse_kind``), and a source without any
    row as ``empty_file``."""
    bad: list[str] = []
    broken: list[str] = []
    n_bad = n_broken = n_rows = 0
    for name, row, error in rows:
        n_rows += 1
        if error is not None:
            n_broken += 1
            if len(broken) < 3:
                broken.append(f"{name}: {error}")
            continue
        text = _row_text(row, text_field)
        if text is None:
            n_bad += 1
            if len(bad) < 3:
                bad.append(
                    name if not isinstance(row, dict) else f"{name} (keys: {', '.join(map(str, row))[:80]})"
                )
            continue
        yield from _text_docs(text, name, normalize)
    if n_bad:
        yield _report(
            source, "bad_rows", f"{n_bad} rows without a string '{text_field}': {'; '.join(bad)}", n_bad
        )
    if n_broken:
        yield _report(source, parse_kind, f"{n_broken} rows: {'; '.join(broken)}"[:600], n_broken)
    if not n_rows:
        yield _report(source, "empty_file", "no rows")


def _named(path: str, rows: Iterable[Row]) -> Iterator[tuple[str, Any, str | None]]:
    """(path:line | path[index] | path, value, parse error) of a file's rows."""
    for r in rows:
        where = (
            f"{path}:{r.line}"
            if r.line is not None
            else f"{path}[{r.index}]"
            if r.index is not None
            else path
        )
        yield where, r.value, r.error


_TABLE_READERS = {".jsonl": jsonl_rows, ".json": partial(json_rows, unwrap=True), ".csv": csv_rows}


def _read_file(path: str, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    """Rows (documents and reports) of one file; a file that fails gives a report row, never an exception.

    Text is UTF-8, or UTF-16/UTF-32 when the file starts with that byte order mark (reported as
    ``transcoded``); undecodable bytes are replaced and the file is reported as ``undecodable``, whatever
    its format.
    """
    ext = Path(path).suffix.lower()
    text_field, normalize = opts.text_field, opts.normalize
    if ext not in opts.text_exts and ext not in opts.table_exts:
        known = ext in TEXT_EXTENSIONS or ext in TABLE_EXTENSIONS
        yield _report(path, "excluded_extension" if known else "unknown_extension", ext or "(none)")
        return
    yield _report(path, "file_read", "", 1)
    decoder: Utf8Decoder | None = None
    try:
        if ext == ".parquet":
            yield from _rows_docs(_named(path, parquet_rows(path, text_field)), path, text_field, normalize)
            return
        with open(path, "rb") as f:
            decoder = Utf8Decoder(sniff_encoding(f))
            if decoder.encoding == "utf-8" and is_binary(f):
                yield _report(path, "binary", "NUL bytes in the first 8 KB")
                return
            if decoder.encoding != "utf-8":
                yield _report(path, "transcoded", decoder.encoding)
            if ext in opts.text_exts:
                yield from _text_file_docs(f, path, normalize, decoder)
        if ext not in opts.text_exts:
            rows = _TABLE_READERS[ext](path, decoder=decoder)
            kind = "bad_rows" if ext == ".csv" else "invalid_json"
            yield from _rows_docs(_named(path, rows), path, text_field, normalize, kind)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is what a bad file raises
        if not _bad_file(e):
            raise
        yield _report(path, "unreadable", f"{type(e).__name__}: {e}"[:300])
    if decoder is not None and decoder.replaced:
        yield _report(path, "undecodable", f"{decoder.replaced} bytes replaced ({decoder.first_error})")


def _bad_file(e: Exception) -> bool:
    """Whether an exception says the file is unusable (pyarrow raises its own types for corrupt files)."""
    return isinstance(e, (OSError, ValueError, csv.Error, RecursionError)) or type(e).__module__.startswith(
        "pyarrow"
    )


def _write_rows(path: str, rows: Iterable[dict[str, Any]]) -> None:
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=_DOC_FEATURES, path=path, writer_batch_size=1000) as writer:
        for row in rows:
            writer.write(row)
        writer.finalize()


def _read_files_job(args: tuple[str, list[str], list[dict[str, Any]], ReadOptions]) -> str:
    """One worker's share: its files (and the resolver's report rows) into one Arrow file."""
    path, files, reports, opts = args

    def rows() -> Iterator[dict[str, Any]]:
        yield from reports
        for f in files:
            yield from _read_file(f, opts)

    _write_rows(path, rows())
    return path


def _memory_rows(src: Any, name: str, text_field: str, normalize: bool) -> Iterator[dict[str, Any]]:
    """Rows of an in-memory source: a list of texts, a Dataset or an IterableDataset (streamed: one row at a
    time; a stream whose columns are not known up front gives its rows whole, and rows without the field
    are counted as ``bad_rows``)."""
    if isinstance(src, (datasets.Dataset, datasets.IterableDataset)):
        cols = src.column_names
        if cols is not None and text_field not in cols:
            yield _report(name, "bad_rows", f"no column '{text_field}' (columns: {', '.join(cols)})")
            return
        picked = src.select_columns([text_field]) if cols is not None else src
        rows: Iterable[Any] = (
            r[text_field] if isinstance(r, dict) and cols is not None else r for r in picked
        )
    else:
        rows = src
    yield from _rows_docs(
        ((f"{name}[{i}]", r, None) for i, r in enumerate(rows)), name, text_field, normalize
    )


def is_texts(src: Any) -> bool:
    """Whether a source is in-memory document texts (a list or tuple of strings); a str is a path.

    >>> is_texts(["doc one", "doc two"]), is_texts("notes/*.txt")
    (True, False)
    """
    return isinstance(src, (list, tuple)) and all(isinstance(s, str) for s in src)


def as_source_list(sources: Any) -> list[Any]:
    """A single source or a list of them -> a list (None -> [])."""
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike, Mapping, datasets.Dataset, datasets.IterableDataset)):
        return [sources]
    return list(sources)


def read_documents(sources: Sequence[Any], cfg: DataConfig, work: Path, tag: str) -> datasets.Dataset:
    """All sources -> one Arrow table of document rows and report rows (memory-mapped, not in RAM).

    Files are read by up to ``cfg.num_proc`` processes (at least 16 files each), each writing its own Arrow
    file under ``work``; ``tag`` names the files and the in-memory sources in reports. A datasets spec is
    loaded here (:func:`~.hf.load_spec`; a streamed one is written to disk row by row).
    """
    opts = ReadOptions.of(cfg)
    text_field, normalize, num_proc = cfg.text_field, cfg.normalize, cfg.num_proc
    files: list[str] = []
    reports: list[dict[str, Any]] = []
    memory: list[tuple[str, Any, str]] = []  # (name in reports, source, text field)
    for i, src in enumerate(sources):
        if isinstance(src, (str, os.PathLike)):
            found = resolve_path(src)
            files += found.files
            reports += [_report(s.name, s.kind, s.detail) for s in found.skipped]
        elif isinstance(src, (datasets.Dataset, datasets.IterableDataset)) or is_texts(src):
            kind = "texts" if is_texts(src) else type(src).__name__
            memory.append((f"{tag}:{kind}#{i}", src, text_field))
        elif is_spec(src):
            spec = parse_spec(src, f"{tag} source #{i}")
            hf_cache = Path(cfg.cache_dir) / "hf-datasets" if cfg.cache_dir else None
            memory.append((spec.label, load_spec(spec, hf_cache), spec.text_field or text_field))
        else:
            raise DataError(
                f"{tag} source #{i} is a {type(src).__name__}: give a path, glob or directory, a datasets spec "
                "{hf: NAME_OR_DIR, ...}, a datasets.Dataset or IterableDataset, or a list of document texts"
            )
    n_jobs = max(1, min(num_proc, len(files) // 16))
    # contiguous shards, concatenated in order: the table is the same whatever num_proc (which is not part
    # of the cache key), so the same duplicates are dropped and the same documents held out
    size = -(-len(files) // n_jobs)
    shards = [files[j * size : (j + 1) * size] for j in range(n_jobs)]
    jobs = [
        (str(work / f"{tag}-files-{j:05d}.arrow"), shard, reports if j == 0 else [], opts)
        for j, shard in enumerate(shards)
    ]
    if n_jobs > 1:
        with ProcessPoolExecutor(n_jobs) as pool:
            paths = list(pool.map(_read_files_job, jobs))
    else:
        paths = [_read_files_job(jobs[0])]
    for j, (name, src, field_) in enumerate(memory):
        path = str(work / f"{tag}-memory-{j:05d}.arrow")
        _write_rows(path, _memory_rows(src, name, field_, normalize))
        paths.append(path)
    return datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in paths])
