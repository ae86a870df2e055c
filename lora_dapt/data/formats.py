"""One reader per file format: text, JSON Lines, JSON, CSV, Parquet.

The readers know how a format is laid out, not what the caller does with a row: :mod:`.sources` turns rows
into corpus documents (and bad rows into report rows), :mod:`.conversations` turns them into SFT
conversations (and bad rows into errors naming file and line).

* Text is UTF-8 with an optional BOM, streamed ``_READ_BYTES`` at a time. :class:`Utf8Decoder` replaces each
  undecodable sequence by U+FFFD, exactly as ``errors="replace"`` would, and counts the replacements itself,
  so the count comes back with the text (from worker processes too) instead of through a global.
* JSON Lines: one value per line, blank lines skipped; a line that does not parse is a :class:`Row` with an
  ``error``, never an exception, so a caller can name every bad line.
* JSON: one value; an array gives one row per item, anything else one row. A file of several values
  ("Extra data": JSON Lines saved as ``.json``) is read as JSON Lines. A file that is not JSON at all raises
  ``json.JSONDecodeError`` (with its line number): the whole file is unusable, not one row.
* CSV: one row per record, as a dict by the header; Parquet: the values of one column.

``errors`` (``"replace"`` or ``"strict"``) is how undecodable bytes in JSON are handled: the corpus keeps the
text with U+FFFD, SFT data reports the line (a ``UnicodeDecodeError`` is a ``ValueError`` like a JSON error).
"""

from __future__ import annotations

import codecs
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

_READ_BYTES = 1 << 22  # text files are read in chunks of this many bytes


_BINARY_PROBE = 8192  # a file with a NUL byte in its first this many bytes is binary


_BOM = codecs.BOM_UTF8


class Utf8Decoder:
    """Incremental UTF-8 decoding (a leading BOM dropped) that replaces each undecodable sequence by U+FFFD,
    as ``errors="replace"`` does, and counts them in ``replaced``; ``first_error`` describes the first.

    >>> dec = Utf8Decoder()
    >>> dec.decode(b"caf\\xe9 cr\\xc3") + dec.decode(b"\\xa8me", final=True)
    'caf\\ufffd crème'
    >>> dec.replaced, dec.first_error
    (1, 'invalid continuation byte (byte 0xe9 at offset 3)')
    """

    def __init__(self) -> None:
        self.replaced = 0
        self.first_error: str | None = None
        self._pending = b""  # an incomplete sequence (or BOM) at the end of the last chunk
        self._offset = 0  # bytes of the file before self._pending
        self._start = True

    def decode(self, data: bytes, final: bool = False) -> str:
        buf = self._pending + data if self._pending else data
        if self._start:
            if not final and len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._pending = buf
                return ""
            self._start = False
            if buf.startswith(_BOM):
                buf = buf[len(_BOM) :]
                self._offset += len(_BOM)
        view = memoryview(buf)
        out: list[str] = []
        pos = 0
        while True:
            try:
                text, used = codecs.utf_8_decode(view[pos:], "strict", final)
            except UnicodeDecodeError as e:  # the rare path: decode the valid prefix, replace, go on
                out.append(codecs.utf_8_decode(view[pos : pos + e.start], "strict", True)[0])
                out.append("\ufffd")
                if self.first_error is None:
                    at = self._offset + pos + e.start
                    self.first_error = f"{e.reason} (byte 0x{buf[pos + e.start]:02x} at offset {at})"
                self.replaced += 1
                pos += e.end
                continue
            out.append(text)
            self._pending = bytes(view[pos + used :])
            self._offset += pos + used
            return "".join(out)


def is_binary(f: BinaryIO) -> bool:
    """Whether an open file has a NUL byte near its start (then it is no text); the position is kept."""
    at = f.tell()
    head = f.read(_BINARY_PROBE)
    f.seek(at)
    return b"\x00" in head


def text_chunks(f: BinaryIO, decoder: Utf8Decoder) -> Iterator[str]:
    """The decoded text of an open binary file, ``_READ_BYTES`` at a time (the last chunk may be empty)."""
    while data := f.read(_READ_BYTES):
        yield decoder.decode(data)
    yield decoder.decode(b"", final=True)


class Row(NamedTuple):
    """One row of a table file and where it is: ``line`` (JSON Lines, CSV: 1-based line) or ``index``
    (JSON array item, Parquet row: 0-based); neither for a file-level row."""

    value: Any
    line: int | None = None
    index: int | None = None
    error: str | None = None
    """Why the row could not be parsed (then ``value`` is None)."""


def _parse_error(e: ValueError) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)"
    return f"not valid JSON ({getattr(e, 'msg', e)})"


def jsonl_rows(path: str | Path, errors: str = "replace") -> Iterator[Row]:
    """The rows of a JSON Lines file, one per non-blank line; a line that does not parse has ``error`` set."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8", errors).strip()
                row = Row(json.loads(line), line=i) if line else None
            except ValueError as e:  # not JSON, or (errors="strict") not UTF-8
                row = Row(None, line=i, error=_parse_error(e))
            if row is not None:
                yield row


def json_rows(path: str | Path, errors: str = "replace", unwrap: bool = False) -> Iterator[Row]:
    """The rows of a JSON file: the items of an array, else the one value (see the module docstring).

    ``unwrap``: an object holding exactly one list (``{"data": [...]}``) gives that list's items.

    Raises:
        json.JSONDecodeError: the file is not JSON (nor JSON Lines).
        UnicodeDecodeError: with ``errors="strict"``, the file is not UTF-8.
    """
    text = Path(path).read_bytes().decode("utf-8-sig", errors)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if "Extra data" in str(e):  # JSON Lines saved as .json
            yield from jsonl_rows(path, errors)
            return
        raise
    if unwrap and isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    for i, row in enumerate(data if isinstance(data, list) else [data]):
        yield Row(row, index=i)


def csv_rows(path: str | Path) -> Iterator[Row]:
    """The records of a CSV file as dicts by its header; ``line`` counts the header as line 1."""
    csv.field_size_limit(sys.maxsize)  # huge cells are documents, not errors
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            yield Row(row, line=i)


def parquet_rows(path: str | Path, column: str) -> Iterator[Row]:
    """``{column: value}`` for each row of a Parquet file; one file-level row ``{"columns": [...]}`` (naming
    the columns there are) when it has no such column."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        yield Row({"columns": pf.schema_arrow.names})
        return
    i = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield Row({column: value}, index=i)
            i += 1
