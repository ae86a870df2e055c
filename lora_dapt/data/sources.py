"""Where the data is: the one resolver of sources, and the documents table the corpus is built from.

What is resolved how:

* A **path, glob or directory** (``str`` or ``os.PathLike``; ``~`` expanded) goes through
  :func:`resolve_path`: an existing file is itself; an existing directory is walked recursively (files in
  name order, then sub-directories in name order), skipping hidden files and directories and, when the
  caller names ``extensions``, files with other extensions; anything with ``*?[`` is a recursive glob
  (matching files only, sorted). What was not returned comes back as :class:`Skipped` (``not_found``,
  ``hidden``), and each caller decides what it means: :func:`read_documents` (the corpus) makes report rows
  of them, :func:`read_text_sources` and the SFT reader raise a ``DataError``.
* A **datasets.Dataset / IterableDataset** gives the column ``text_field`` of every row.
* A **list or tuple of strings** nested inside the sources list is in-memory document texts.

Files are read by :mod:`.formats` (one reader per format). :func:`read_documents` streams every document
into one Arrow table next to *report rows* (status != "ok") for what could not be used, so nothing vanishes
silently and counts made in worker processes come back inside the rows: a file's undecodable bytes are a
report row its reader yields, not a counter.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Literal

import datasets

from ..errors import DataError
from .clean import clean_text
from .formats import Row, Utf8Decoder, csv_rows, is_binary, json_rows, jsonl_rows, parquet_rows, text_chunks

TEXT_EXTENSIONS = (".txt", ".md", ".rst")
"""Read whole, one document per file."""


TABLE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
"""One document per row, from the column ``DataConfig.text_field``."""


Source = str | os.PathLike | datasets.Dataset | datasets.IterableDataset | Sequence[str]
"""A path, glob or directory; a ``datasets`` dataset; or a list/tuple of document texts."""


@dataclass(frozen=True)
class Skipped:
    """Something a path, glob or directory named that :func:`resolve_path` did not return, and why."""

    name: str
    kind: Literal["not_found", "hidden"]
    detail: str


@dataclass
class Resolved:
    """The files one path, glob or directory names."""

    spec: str
    """The source as given."""
    kind: Literal["file", "directory", "glob", "missing"]
    files: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def resolve_path(spec: str | os.PathLike, extensions: Sequence[str] | None = None) -> Resolved:
    """The files a path, glob or directory names (see the module docstring for the rules).

    ``extensions`` (lower case, with the dot) filters what a directory walk returns; a file named directly
    or matched by a glob is returned whatever its extension, for its reader to accept or report.

    >>> r = resolve_path("no/such/dir/*.txt")
    >>> r.kind, r.files, r.skipped[0].kind
    ('glob', [], 'not_found')
    """
    name = str(spec)
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return Resolved(name, "file", [str(path)])
    if path.is_dir():
        return _walk(name, path, extensions)
    if any(c in name for c in "*?["):
        files = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        return Resolved(
            name, "glob", files, [] if files else [Skipped(name, "not_found", "the glob matched no file")]
        )
    return Resolved(name, "missing", [], [Skipped(name, "not_found", "no such file or directory")])


def _walk(name: str, top: Path, extensions: Sequence[str] | None) -> Resolved:
    out = Resolved(name, "directory")
    for root, dirs, names in os.walk(top):
        for d in [d for d in dirs if d.startswith(".")]:
            out.skipped.append(Skipped(os.path.join(root, d), "hidden", "hidden directory"))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            full = os.path.join(root, n)
            if n.startswith("."):
                out.skipped.append(Skipped(full, "hidden", "hidden file"))
            elif extensions is None or os.path.splitext(n)[1].lower() in extensions:
                out.files.append(full)
    return out


def read_text_sources(sources: str | Path | Sequence[str | Path]) -> list[str]:
    """Read .txt/.md/.rst files given as paths, directories (searched recursively) or globs; one text per file.

    Strict: a source that names no file, or a file that is not UTF-8 text, raises ``DataError``.

    Example::

        texts = read_text_sources(["notes/*.md", "extra.txt"])
    """
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files: list[str] = []
    for item in items:
        found = resolve_path(item, TEXT_EXTENSIONS)
        if found.kind in ("glob", "missing") and not found.files:
            raise DataError(
                f"{item!s}: no such file, directory or matching glob. To score a string itself, pass a "
                "list: perplexity(model, tok, [text])"
            )
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
    return texts


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


def _text_file_docs(f: BinaryIO, path: str, normalize: bool) -> Iterator[dict[str, Any]]:
    decoder = Utf8Decoder()
    yield from _parts_docs(text_chunks(f, decoder), path, normalize)
    if decoder.replaced:
        yield _report(path, "undecodable", f"{decoder.replaced} bytes replaced")


def _row_text(row: Any, text_field: str) -> str | None:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        value = row.get(text_field)
        return value if isinstance(value, str) else None
    return None


def _rows_docs(
    rows: Iterable[tuple[str, Any]], source: str, text_field: str, normalize: bool
) -> Iterator[dict[str, Any]]:
    """Documents of (name, row) pairs; the rows without a string ``text_field`` as one report row."""
    bad: list[str] = []
    n_bad = 0
    for name, row in rows:
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


def _named(path: str, rows: Iterable[Row]) -> Iterator[tuple[str, Any]]:
    """(path:line | path[index] | path, value) of a file's rows (a row that did not parse has value None)."""
    for r in rows:
        where = (
            f"{path}:{r.line}"
            if r.line is not None
            else f"{path}[{r.index}]"
            if r.index is not None
            else path
        )
        yield where, r.value


_TABLE_READERS = {".jsonl": jsonl_rows, ".json": partial(json_rows, unwrap=True), ".csv": csv_rows}


def _read_file(path: str, text_field: str, normalize: bool) -> Iterator[dict[str, Any]]:
    """Rows (documents and reports) of one file; a file that fails gives a report row, never an exception."""
    ext = Path(path).suffix.lower()
    if ext not in TEXT_EXTENSIONS + TABLE_EXTENSIONS:
        yield _report(path, "unknown_extension", ext or "(none)")
        return
    yield _report(path, "file_read", "", 1)
    try:
        if ext == ".parquet":
            rows = parquet_rows(path, text_field)
        else:
            with open(path, "rb") as f:
                if is_binary(f):
                    yield _report(path, "binary", "NUL bytes in the first 8 KB")
                    return
                if ext in TEXT_EXTENSIONS:
                    yield from _text_file_docs(f, path, normalize)
                    return
            rows = _TABLE_READERS[ext](path)
        yield from _rows_docs(_named(path, rows), path, text_field, normalize)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is what a bad file raises
        if not _bad_file(e):
            raise
        yield _report(path, "unreadable", f"{type(e).__name__}: {e}"[:300])


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


def _read_files_job(args: tuple[str, list[str], list[dict[str, Any]], str, bool]) -> str:
    """One worker's share: its files (and the resolver's report rows) into one Arrow file."""
    path, files, reports, text_field, normalize = args

    def rows() -> Iterator[dict[str, Any]]:
        yield from reports
        for f in files:
            yield from _read_file(f, text_field, normalize)

    _write_rows(path, rows())
    return path


def _memory_rows(src: Any, name: str, text_field: str, normalize: bool) -> Iterator[dict[str, Any]]:
    """Rows of an in-memory source: a list of texts, a Dataset or an IterableDataset."""
    if isinstance(src, (datasets.Dataset, datasets.IterableDataset)):
        cols = src.column_names
        if cols is not None and text_field not in cols:
            yield _report(name, "bad_rows", f"no column '{text_field}' (columns: {', '.join(cols)})")
            return
        rows: Iterable[Any] = (
            r[text_field] if isinstance(r, dict) else r for r in src.select_columns([text_field])
        )
    else:
        rows = src
    yield from _rows_docs(((f"{name}[{i}]", r) for i, r in enumerate(rows)), name, text_field, normalize)


def is_texts(src: Any) -> bool:
    """Whether a source is in-memory document texts (a list or tuple of strings)."""
    return isinstance(src, (list, tuple)) and all(isinstance(s, str) for s in src)


def as_source_list(sources: Any) -> list[Any]:
    """A single source or a list of them -> a list (None -> [])."""
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike, datasets.Dataset, datasets.IterableDataset)):
        return [sources]
    return list(sources)


def read_documents(
    sources: Sequence[Any], text_field: str, normalize: bool, work: Path, tag: str, num_proc: int
) -> datasets.Dataset:
    """All sources -> one Arrow table of document rows and report rows (memory-mapped, not in RAM).

    Files are read by up to ``num_proc`` processes (at least 16 files each), each writing its own Arrow file
    under ``work``; ``tag`` names the files and the in-memory sources in reports.
    """
    files: list[str] = []
    reports: list[dict[str, Any]] = []
    memory: list[tuple[str, Any]] = []
    for i, src in enumerate(sources):
        if isinstance(src, (str, os.PathLike)):
            found = resolve_path(src)
            files += found.files
            reports += [_report(s.name, s.kind, s.detail) for s in found.skipped]
        elif isinstance(src, (datasets.Dataset, datasets.IterableDataset)) or is_texts(src):
            kind = "texts" if is_texts(src) else type(src).__name__
            memory.append((f"{tag}:{kind}#{i}", src))
        else:
            raise DataError(
                f"{tag} source #{i} is a {type(src).__name__}: give a path, glob or directory, a datasets.Dataset "
                "or IterableDataset, or a list of document texts"
            )
    n_jobs = max(1, min(num_proc, len(files) // 16))
    # contiguous shards, concatenated in order: the table is the same whatever num_proc (which is not part
    # of the cache key), so the same duplicates are dropped and the same documents held out
    size = -(-len(files) // n_jobs)
    shards = [files[j * size : (j + 1) * size] for j in range(n_jobs)]
    jobs = [
        (str(work / f"{tag}-files-{j:05d}.arrow"), shard, reports if j == 0 else [], text_field, normalize)
        for j, shard in enumerate(shards)
    ]
    if n_jobs > 1:
        with ProcessPoolExecutor(n_jobs) as pool:
            paths = list(pool.map(_read_files_job, jobs))
    else:
        paths = [_read_files_job(jobs[0])]
    for j, (name, src) in enumerate(memory):
        path = str(work / f"{tag}-memory-{j:05d}.arrow")
        _write_rows(path, _memory_rows(src, name, text_field, normalize))
        paths.append(path)
    return datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in paths])
