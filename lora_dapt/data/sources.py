"""data.sources (split from corpus)."""

from __future__ import annotations

import codecs
import csv
import glob
import glob as globlib
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError
from .clean import clean_text

TEXT_EXTENSIONS = (".txt", ".md", ".rst")
"""Read whole, one document per file."""


TABLE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
"""One document per row, from the column ``DataConfig.text_field``."""


Source = str | os.PathLike | datasets.Dataset | datasets.IterableDataset | Sequence[str]
"""A path, glob or directory; a ``datasets`` dataset; or a list/tuple of document texts."""


_PART_CHARS = 1 << 20  # a document longer than this many characters is cut (at a line break) into parts


_READ_BYTES = 1 << 22  # text files are read in chunks of this many bytes


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


_REPLACED = [0]  # per-process count of bytes replaced by the decoder's error handler


def _count_replace(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeDecodeError)
    _REPLACED[0] += 1
    return "\ufffd", err.end


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


def _text_docs(text: str, source: str, group: str, normalize: bool) -> Iterator[dict[str, Any]]:
    """One document, cut into parts when it is huge."""
    if len(text) < 2 * _PART_CHARS:
        yield _doc(text, source, group, normalize)
        return
    n = 0
    for n, (part, last) in enumerate(_cut_parts([text])):  # noqa: B007
        yield _doc(part, source if n == 0 else f"{source}#{n}", group, normalize, n, last)
    yield _report(source, "split", f"{n + 1} parts")


def _read_text_file(path: str, normalize: bool) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        head = f.read(_READ_BYTES)
        if b"\x00" in head[:8192]:
            yield _report(path, "binary", "NUL bytes in the first 8 KB")
            return
        _REPLACED[0] = 0
        dec = codecs.getincrementaldecoder("utf-8-sig")(errors="lora_dapt_replace")

        def chunks() -> Iterator[str]:
            data = head
            while data:
                yield dec.decode(data)
                data = f.read(_READ_BYTES)
            yield dec.decode(b"", final=True)

        n = 0
        for n, (part, last) in enumerate(_cut_parts(chunks())):  # noqa: B007
            yield _doc(part, path if n == 0 else f"{path}#{n}", path, normalize, n, last)
        if n:
            yield _report(path, "split", f"{n + 1} parts")
        if _REPLACED[0]:
            yield _report(path, "undecodable", f"{_REPLACED[0]} bytes replaced")


def _row_text(row: Any, text_field: str) -> str | None:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        value = row.get(text_field)
        return value if isinstance(value, str) else None
    return None


def _read_rows(
    rows: Iterable[tuple[str, Any]], path: str, text_field: str, normalize: bool
) -> Iterator[dict[str, Any]]:
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
        yield from _text_docs(text, name, name, normalize)
    if n_bad:
        yield _report(
            path, "bad_rows", f"{n_bad} rows without a string '{text_field}': {'; '.join(bad)}", n_bad
        )


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="lora_dapt_replace").strip()
            if not line:
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except ValueError:
                yield f"{path}:{i}", None  # counted as a bad row


def _json_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8-sig", errors="lora_dapt_replace") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            if "Extra data" in str(e):  # JSON Lines saved as .json
                yield from _jsonl_rows(path)
                return
            raise
    if isinstance(data, dict):  # {"data": [...]} or a single record
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        data = [data]
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _parquet_rows(path: str, text_field: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        yield path, {"columns": pf.schema_arrow.names}  # one bad row naming the columns
        return
    i = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield f"{path}[{i}]", {text_field: value}
            i += 1


def _csv_rows(path: str) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(sys.maxsize)  # huge cells are documents, not errors
    with open(path, encoding="utf-8-sig", errors="lora_dapt_replace", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            yield f"{path}:{i}", row


def _read_file(path: str, text_field: str, normalize: bool) -> Iterator[dict[str, Any]]:
    """Rows (documents and reports) of one file; a file that fails gives a report row, never an exception."""
    ext = Path(path).suffix.lower()
    if ext not in TEXT_EXTENSIONS + TABLE_EXTENSIONS:
        yield _report(path, "unknown_extension", ext or "(none)")
        return
    yield _report(path, "file_read", "", 1)
    try:
        if ext in TEXT_EXTENSIONS:
            yield from _read_text_file(path, normalize)
            return
        if ext == ".parquet":
            rows: Iterable[tuple[str, Any]] = _parquet_rows(path, text_field)
        else:
            with open(path, "rb") as f:
                if b"\x00" in f.read(8192):
                    yield _report(path, "binary", "NUL bytes in the first 8 KB")
                    return
            rows = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}[ext](path)
        yield from _read_rows(rows, path, text_field, normalize)
    except (OSError, ValueError, csv.Error, RecursionError) as e:
        yield _report(path, "unreadable", f"{type(e).__name__}: {e}"[:300])
    except Exception as e:  # pyarrow raises its own types for corrupt parquet files
        if type(e).__module__.startswith("pyarrow"):
            yield _report(path, "unreadable", f"{type(e).__name__}: {e}"[:300])
        else:
            raise


def _resolve(spec: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Files named by a path, glob or directory (recursive, sorted), and report rows for what was skipped."""
    reports: list[dict[str, Any]] = []
    if any(c in spec for c in "*?["):
        found = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            reports.append(_report(spec, "not_found", "the glob matched no file"))
        return found, reports
    p = Path(spec)
    if p.is_file():
        return [str(p)], reports
    if p.is_dir():
        files = []
        for root, dirs, names in os.walk(p):
            for d in [d for d in dirs if d.startswith(".")]:
                reports.append(_report(os.path.join(root, d), "hidden", "hidden directory"))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                full = os.path.join(root, n)
                (
                    reports.append(_report(full, "hidden", "hidden file"))
                    if n.startswith(".")
                    else files.append(full)
                )
        return files, reports
    reports.append(_report(spec, "not_found", "no such file or directory"))
    return [], reports


def _write_rows(path: str, rows: Iterable[dict[str, Any]]) -> None:
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=_DOC_FEATURES, path=path, writer_batch_size=1000) as writer:
        for row in rows:
            writer.write(row)
        writer.finalize()


def _read_files_job(args: tuple[str, list[str], list[dict[str, Any]], str, bool]) -> str:
    path, files, reports, text_field, normalize = args

    def rows() -> Iterator[dict[str, Any]]:
        yield from reports
        for f in files:
            yield from _read_file(f, text_field, normalize)

    _write_rows(path, rows())
    return path


def _source_rows(src: Any, name: str, text_field: str, normalize: bool) -> Iterator[dict[str, Any]]:
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
    yield from _read_rows(((f"{name}[{i}]", r) for i, r in enumerate(rows)), name, text_field, normalize)


def _is_texts(src: Any) -> bool:
    return isinstance(src, (list, tuple)) and all(isinstance(s, str) for s in src)


def _read_sources(
    sources: Sequence[Any], text_field: str, normalize: bool, work: Path, tag: str, num_proc: int
) -> datasets.Dataset:
    """All sources -> one Arrow table of document rows and report rows (memory-mapped, not in RAM)."""
    files: list[str] = []
    reports: list[dict[str, Any]] = []
    memory: list[tuple[str, Any]] = []
    for i, src in enumerate(sources):
        if isinstance(src, (str, os.PathLike)):
            found, rep = _resolve(str(src))
            files += found
            reports += rep
        elif isinstance(src, (datasets.Dataset, datasets.IterableDataset)) or _is_texts(src):
            kind = "texts" if _is_texts(src) else type(src).__name__
            memory.append((f"{tag}:{kind}#{i}", src))
        else:
            raise DataError(
                f"{tag} source #{i} is a {type(src).__name__}: give a path, glob or directory, a datasets.Dataset "
                "or IterableDataset, or a list of document texts"
            )
    n_jobs = max(1, min(num_proc, len(files) // 16))
    shards = [files[j::n_jobs] for j in range(n_jobs)]
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
        _write_rows(path, _source_rows(src, name, text_field, normalize))
        paths.append(path)
    return datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in paths])


def _as_list(sources: Any) -> list[Any]:
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike, datasets.Dataset, datasets.IterableDataset)):
        return [sources]
    return list(sources)


def read_text_sources(sources: str | Path | Sequence[str | Path]) -> list[str]:
    """Read .txt/.md/.rst files given as paths, directories (searched recursively) or globs; one text per file.

    Example::

        texts = read_text_sources(["notes/*.md", "extra.txt"])
    """
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_EXTENSIONS)
        else:
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(str(item)), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(
                    f"{item!s}: no such file, directory or matching glob. To score a string itself, pass a "
                    "list: perplexity(model, tok, [text])"
                )
            files += matches
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: cannot read as UTF-8 text: {e}") from None
    return texts
