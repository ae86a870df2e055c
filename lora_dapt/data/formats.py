"""One reader per file format: text, JSON Lines, JSON, CSV, Parquet; and which extensions are read as what.

Text is prose (.txt .md .rst) and, by default, source code, markup and configuration
(:data:`CODE_EXTENSIONS`: .py .js .ts .java .c .h .cpp .go .rs .sh .sql .html .xml .tex .yaml .toml ...),
each file one document; ``DataConfig.extensions`` restricts or extends the set
(:func:`readable_extensions`). Binary files are found by content (a NUL byte), whatever their extension.

The readers know how a format is laid out, not what the caller does with a row: :mod:`.sources` turns rows
into corpus documents (and bad rows into report rows), :mod:`.conversations` turns them into SFT
conversations (and bad rows into errors naming file and line).

* Text is UTF-8 with an optional BOM, or UTF-16/UTF-32 when the file starts with that BOM
  (:func:`sniff_encoding`), streamed ``_READ_BYTES`` at a time. :class:`Utf8Decoder` replaces each
  undecodable sequence by U+FFFD, exactly as ``errors="replace"`` would, and counts the replacements itself,
  so the count comes back with the text (from worker processes too) instead of through a global; the
  table readers take one too, so undecodable bytes in JSON and CSV are counted like a text file's.
* JSON Lines: one value per line, blank lines skipped; a line that does not parse is a :class:`Row` with an
  ``error``, never an exception, so a caller can name every bad line.
* JSON: one value; an array gives one row per item, anything else one row. A file of several values
  ("Extra data": JSON Lines saved as ``.json``) is read as JSON Lines. A file that is not JSON at all raises
  ``json.JSONDecodeError`` (with its line number): the whole file is unusable, not one row.
* CSV: one row per record, as a dict by the header; a record that does not parse (a quoted field that
  never closes would swallow every row after it) is a :class:`Row` with an ``error`` naming its first line,
  and the lines after that line are read again. Parquet: the values of one column.

``errors`` (``"replace"`` or ``"strict"``) is how undecodable bytes in JSON are handled: the corpus keeps the
text with U+FFFD, SFT data reports the line (a ``UnicodeDecodeError`` is a ``ValueError`` like a JSON error).
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from .._sections import short_repr

_READ_BYTES = 1 << 22  # text files are read in chunks of this many bytes


PROSE_EXTENSIONS = (".txt", ".md", ".rst")
"""Prose read whole, one document per file."""


CODE_EXTENSIONS = (
    # source code
    ".py", ".pyi", ".js", ".jsx", ".mjs", ".ts", ".tsx", ".java", ".c", ".h", ".cc", ".cpp", ".cxx",
    ".hpp", ".hh", ".cs", ".go", ".rs", ".sh", ".bash", ".zsh", ".ps1", ".sql", ".rb", ".php", ".swift",
    ".kt", ".kts", ".scala", ".lua", ".r", ".m", ".mm", ".pl", ".pm", ".jl", ".hs", ".ml", ".ex", ".exs",
    ".erl", ".clj", ".dart", ".f90", ".vb", ".groovy", ".cmake", ".proto", ".cu",
    # markup, styles and configuration
    ".html", ".htm", ".xml", ".xhtml", ".tex", ".bib", ".css", ".scss", ".less", ".yaml", ".yml",
    ".toml", ".ini", ".cfg", ".conf", ".properties", ".adoc", ".org",
)  # fmt: skip
"""Source code, markup and configuration, read as text (one document per file) unless
``DataConfig.extensions`` says otherwise. Not here: ``.svg`` and ``.ipynb`` (mostly base64 images; add them
with ``'+.ipynb'``), and files without an extension (``Makefile``: reported as ``unknown_extension``)."""


TEXT_EXTENSIONS = PROSE_EXTENSIONS + CODE_EXTENSIONS
"""Every extension read whole as text by default."""


TABLE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
"""One document per row, from the column ``DataConfig.text_field``."""


def readable_extensions(rules: Sequence[str] = ()) -> tuple[frozenset[str], frozenset[str]]:
    """(text extensions, table extensions) read under ``DataConfig.extensions`` rules.

    No rules: :data:`TEXT_EXTENSIONS` and :data:`TABLE_EXTENSIONS`. Plain entries (``'.py'``) replace that
    default with exactly themselves; ``'+.foo'`` adds ``.foo`` (read as text) and ``'-.html'`` removes one,
    from the default or from the plain entries. A table extension stays a table format when kept.

    >>> text, tables = readable_extensions([".py", ".jsonl"])
    >>> sorted(text), sorted(tables)
    (['.py'], ['.jsonl'])
    >>> ".foo" in readable_extensions(["+.foo"])[0], ".html" in readable_extensions(["-.html"])[0]
    (True, False)
    """
    rules = [r.lower() for r in rules]
    plain = {r for r in rules if r[:1] == "."}
    chosen = set(plain) if plain else set(TEXT_EXTENSIONS + TABLE_EXTENSIONS)
    chosen |= {r[1:] for r in rules if r[:1] == "+"}
    chosen -= {r[1:] for r in rules if r[:1] == "-"}
    tables = frozenset(e for e in chosen if e in TABLE_EXTENSIONS)
    return frozenset(chosen - tables), tables


def extension_problems(rules: Sequence[Any], key: str = "data.extensions") -> list[str]:
    """Problem lines for ``DataConfig.extensions`` rules that are not '.ext', '+.ext' or '-.ext'."""
    out = []
    for i, rule in enumerate(rules):
        body = rule[1:] if isinstance(rule, str) and rule[:1] in "+-" else rule
        if not (isinstance(body, str) and _EXT.fullmatch(body)):
            out.append(
                f"{key}[{i}] = {short_repr(rule)}: give an extension with its dot: '.py' (read only the listed "
                "extensions), '+.foo' (read .foo as text besides the default ones) or '-.html' (skip one)"
            )
    return out


_EXT = re.compile(r"\.[A-Za-z0-9_+-]{1,20}")


_BINARY_PROBE = 8192  # a file with a NUL byte in its first this many bytes is binary


_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


_DECODERS = {
    "utf-8": codecs.utf_8_decode,
    "utf-16-le": codecs.utf_16_le_decode,
    "utf-16-be": codecs.utf_16_be_decode,
    "utf-32-le": codecs.utf_32_le_decode,
    "utf-32-be": codecs.utf_32_be_decode,
}


def bom_encoding(head: bytes) -> str:
    """The encoding a file's first bytes announce with a byte order mark; 'utf-8' without one.

    >>> bom_encoding(codecs.BOM_UTF16_LE + "hi".encode("utf-16-le")), bom_encoding(b"hi")
    ('utf-16-le', 'utf-8')
    """
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8")


def sniff_encoding(f: BinaryIO) -> str:
    """:func:`bom_encoding` of an open binary file; the position is kept."""
    at = f.tell()
    head = f.read(4)
    f.seek(at)
    return bom_encoding(head)


class Utf8Decoder:
    """Incremental decoding (a leading BOM dropped) that replaces each undecodable sequence by U+FFFD,
    as ``errors="replace"`` does, and counts them in ``replaced``; ``first_error`` describes the first.

    UTF-8 unless ``encoding`` names a UTF-16/UTF-32 byte order (what :func:`sniff_encoding` found).

    >>> dec = Utf8Decoder()
    >>> dec.decode(b"caf\\xe9 cr\\xc3") + dec.decode(b"\\xa8me", final=True)
    'caf\\ufffd crème'
    >>> dec.replaced, dec.first_error
    (1, 'invalid continuation byte (byte 0xe9 at offset 3)')
    """

    def __init__(self, encoding: str = "utf-8") -> None:
        self.encoding = encoding
        self.replaced = 0
        self.first_error: str | None = None
        self._codec = _DECODERS[encoding]
        self._bom = next(bom for bom, enc in _BOMS if enc == encoding)
        self._pending = b""  # an incomplete sequence (or BOM) at the end of the last chunk
        self._offset = 0  # bytes of the file before self._pending
        self._start = True

    def decode(self, data: bytes, final: bool = False) -> str:
        buf = self._pending + data if self._pending else data
        if self._start:
            bom = self._bom
            if not final and len(buf) < len(bom) and bom.startswith(buf):
                self._pending = buf
                return ""
            self._start = False
            if buf.startswith(bom):
                buf = buf[len(bom) :]
                self._offset += len(bom)
        view = memoryview(buf)
        out: list[str] = []
        pos = 0
        while True:
            try:
                text, used = self._codec(view[pos:], "strict", final)
            except UnicodeDecodeError as e:  # the rare path: decode the valid prefix, replace, go on
                out.append(self._codec(view[pos : pos + e.start], "strict", True)[0])
                out.append("\ufffd")
                if self.first_error is None:
                    at = self._offset + pos + e.start
                    self.first_error = f"{e.reason} (byte 0x{buf[pos + e.start]:02x} at offset {at})"
                self.replaced += 1
                pos += max(e.end, e.start + 1)
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


def jsonl_rows(
    path: str | Path, errors: str = "replace", decoder: Utf8Decoder | None = None
) -> Iterator[Row]:
    """The rows of a JSON Lines file, one per non-blank line; a line that does not parse has ``error`` set.

    ``errors="replace"``: undecodable bytes become U+FFFD, counted in ``decoder`` (give one to read the
    count; its encoding says how the file is read, a UTF-16/32 BOM included). ``"strict"``: such a line is a
    row with an ``error``.
    """
    if errors != "strict":
        yield from _jsonl_decoded(path, decoder or Utf8Decoder())
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8").strip()
                row = Row(json.loads(line), line=i) if line else None
            except ValueError as e:  # not JSON, or not UTF-8
                row = Row(None, line=i, error=_parse_error(e))
            if row is not None:
                yield row


def _jsonl_decoded(path: str | Path, decoder: Utf8Decoder) -> Iterator[Row]:
    """JSON Lines rows of a file decoded in chunks by ``decoder`` (counting what it replaces)."""
    i = 0
    with open(path, "rb") as f:
        for line in _split_lines(text_chunks(f, decoder), "\n"):
            i += 1
            line = line.strip()
            if not line:
                continue
            try:
                yield Row(json.loads(line), line=i)
            except ValueError as e:
                yield Row(None, line=i, error=_parse_error(e))


def _split_lines(chunks: Iterator[str], sep: str) -> Iterator[str]:
    """The lines of a stream of text chunks, without their ``sep``."""
    rest = ""
    for chunk in chunks:
        if not chunk:
            continue
        lines = (rest + chunk).split(sep)
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def json_rows(
    path: str | Path, errors: str = "replace", unwrap: bool = False, decoder: Utf8Decoder | None = None
) -> Iterator[Row]:
    """The rows of a JSON file: the items of an array, else the one value (see the module docstring); none
    for a file that is empty or blank.

    ``unwrap``: an object holding exactly one list (``{"data": [...]}``) gives that list's items.
    ``decoder``: as for :func:`jsonl_rows` (with ``errors="replace"``).

    Raises:
        json.JSONDecodeError: the file is not JSON (nor JSON Lines).
        UnicodeDecodeError: with ``errors="strict"``, the file is not UTF-8.
    """
    data = Path(path).read_bytes()
    if errors == "strict":
        text = data.decode("utf-8-sig")
    else:
        text = (decoder or Utf8Decoder()).decode(data, final=True)
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if "Extra data" in str(e):  # JSON Lines saved as .json
            yield from _jsonl_text(text)
            return
        raise
    if unwrap and isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else value
    for i, row in enumerate(value if isinstance(value, list) else [value]):
        yield Row(row, index=i)


def _jsonl_text(text: str) -> Iterator[Row]:
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if line:
            try:
                yield Row(json.loads(line), line=i)
            except ValueError as e:
                yield Row(None, line=i, error=_parse_error(e))


class _Lines:
    """The lines of a text stream for the csv module (ends kept; split at \\r\\n, \\r, \\n only, as a file
    opened with ``newline=""``), numbered, holding the lines of the record being read so that the lines an
    unterminated quote swallowed can be read again."""

    def __init__(self, chunks: Iterator[str]) -> None:
        self._lines = self._split(chunks)
        self.again: list[str] = []
        self.line = 0  # lines handed out
        self.held: list[str] = []

    @staticmethod
    def _split(chunks: Iterator[str]) -> Iterator[str]:
        rest = ""
        for chunk in chunks:
            buf = rest + chunk
            lines = _EOL.split(buf)
            # _EOL captures the separators: [text, sep, text, sep, ..., tail]
            rest = lines.pop()
            if rest == "" and lines and lines[-1] == "\r":  # \r at a chunk's end: \r\n may follow
                lines.pop()
                rest = lines.pop() + "\r"
            for j in range(0, len(lines), 2):
                yield lines[j] + lines[j + 1]
        if rest:
            yield rest

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.again.pop() if self.again else next(self._lines)
        self.line += 1
        self.held.append(line)
        return line

    def mark(self) -> int:
        """Start a record; returns its first line's number."""
        self.held = []
        return self.line + 1

    def read_again(self, start: int) -> None:
        """The record that started at line ``start`` is bad: read its lines after the first one again."""
        self.again.extend(reversed(self.held[1:]))
        self.line = start


_EOL = re.compile(r"(\r\n|\r|\n)")


def csv_rows(path: str | Path, decoder: Utf8Decoder | None = None) -> Iterator[Row]:
    """The records of a CSV file as dicts by its header (``line``: the record's first line, the header is
    line 1); none for a file without records.

    A record the csv module cannot parse, above all a quoted field that never closes (which would swallow
    every row after it), is a row with an ``error`` naming its line, and the lines after that line are read
    again, so the rows after it are kept. ``decoder``: as for :func:`jsonl_rows`.
    """
    csv.field_size_limit(sys.maxsize)  # huge cells are documents, not errors
    with open(path, "rb") as f:
        lines = _Lines(text_chunks(f, decoder or Utf8Decoder()))
        header: list[str] | None = None
        reader = csv.reader(lines, strict=True)
        while True:
            start = lines.mark()
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                why = "a quoted field never closes" if "end of data" in str(e) else str(e)
                yield Row(
                    None, line=start, error=f"not valid CSV ({why}); the lines after it were read again"
                )
                lines.read_again(start)
                reader = csv.reader(lines, strict=True)
                continue
            if not record:
                continue
            if header is None:
                header = record
                continue
            row: dict[Any, Any] = dict(zip(header, record, strict=False))
            if len(record) > len(header):  # as csv.DictReader: extra values under the key None
                row[None] = record[len(header) :]
            for k in header[len(record) :]:
                row[k] = None
            yield Row(row, line=start)


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
