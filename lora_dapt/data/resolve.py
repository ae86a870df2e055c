"""The resolver of path sources: what files a path, glob or directory names, and what it skipped and why.

* An existing **file** is itself, if it is a regular file; a FIFO, socket or device is ``not_regular``
  (reading one would block or never end), and so is one met in a walk or matched by a glob.
* An existing **directory** is walked recursively: files in name order, then sub-directories in name order;
  hidden files and directories (a leading dot) are skipped (``hidden``). Symlinked directories are
  followed. Every directory and file is taken once by its real path: a symlink back to a directory above
  it is ``symlink_loop`` (not followed, reported once), a directory or file reached a second time through a
  symlink is ``seen_twice`` (read once).
* Anything else with ``*?[`` is a **glob** (``**``: any number of directories), walked the same way from
  its last directory without glob characters, so it ends even through a symlinked ``..``; it returns
  files only, sorted.

The cost on ordinary data is the directory listing itself: a regular file's type comes from the listing
(no stat); a symlink costs one ``realpath``, a directory one.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

SkipKind = Literal["not_found", "hidden", "not_regular", "symlink_loop", "seen_twice"]


@dataclass(frozen=True)
class Skipped:
    """Something a path, glob or directory named that :func:`resolve_path` did not return, and why."""

    name: str
    kind: SkipKind
    detail: str


@dataclass
class Resolved:
    """The files one path, glob or directory names."""

    spec: str
    """The source as given."""
    kind: Literal["file", "directory", "glob", "missing"]
    files: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


_NAME_CHARS = 120  # a source named in a report is cut to this many characters (a document passed as a path)


def _shown(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else f"{name[:_NAME_CHARS]}... ({len(name):,} characters)"


def resolve_path(spec: str | os.PathLike, extensions: Sequence[str] | None = None) -> Resolved:
    """The files a path, glob or directory names (see the module docstring for the rules).

    ``extensions`` (lower case, with the dot) filters what a directory walk returns; a file named directly
    or matched by a glob is returned whatever its extension, for its reader to accept or report. Only regular
    files are returned: a FIFO, socket or device (which would block or never end when read) is skipped as
    ``not_regular``. Symlinked directories are followed; one that leads back to a directory above it is
    ``symlink_loop`` (not followed), and a file or directory reached a second time through a symlink is read
    once (``seen_twice``, by real path).

    >>> r = resolve_path("no/such/dir/*.txt")
    >>> r.kind, r.files, r.skipped[0].kind
    ('glob', [], 'not_found')
    """
    name = str(spec)
    path = Path(os.path.expanduser(name))
    try:
        st = os.stat(path)
    except OSError as e:
        if any(c in name for c in "*?[") and e.errno != errno.ENAMETOOLONG:
            return _glob(name, str(path))
        detail = (
            "no such file or directory" if e.errno == errno.ENOENT else f"not a usable path ({e.strerror})"
        )
        return Resolved(name, "missing", [], [Skipped(_shown(name), "not_found", detail)])
    if stat.S_ISREG(st.st_mode):
        return Resolved(name, "file", [str(path)])
    if stat.S_ISDIR(st.st_mode):
        walk = _Walk(name, extensions)
        walk.directory(str(path), os.path.realpath(path), [])
        return walk.out
    return Resolved(name, "file", [], [Skipped(name, "not_regular", _file_type(st.st_mode))])


def _file_type(mode: int) -> str:
    """What a non-regular file is, for a report: 'a FIFO (named pipe)', 'a socket', 'a device'."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe): not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket: not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device: not a regular file"
    return "not a regular file"


class _Walk:
    """One recursive walk (a directory, or the directories a glob descends into): files in name order, then
    sub-directories in name order, each directory and file once by real path, loops cut."""

    def __init__(self, name: str, extensions: Sequence[str] | None, glob_parts: list[str] | None = None):
        self.out = Resolved(name, "glob" if glob_parts is not None else "directory")
        self.extensions = extensions
        self.pattern = glob_parts
        # a glob names hidden entries only when one of its parts starts with a dot (as glob.glob does)
        self.report_hidden = glob_parts is None
        self.seen_files: dict[str, str] = {}
        self.seen_dirs: dict[str, str] = {}

    def directory(self, path: str, real: str, rel: list[str], ancestors: tuple[str, ...] = ()) -> None:
        """Walk ``path`` (real path ``real``, parts ``rel`` below the walk's top)."""
        self.seen_dirs[real] = path
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.out.skipped.append(Skipped(path, "not_found", f"cannot list the directory ({e.strerror})"))
            return
        subdirs = []
        for entry in entries:
            if entry.name.startswith(".") and not self._names_hidden(rel):
                if self.report_hidden:
                    kind = "hidden directory" if entry.is_dir() else "hidden file"
                    self.out.skipped.append(Skipped(entry.path, "hidden", kind))
                continue
            if entry.is_dir():
                subdirs.append(entry)
            else:
                self._file(entry, real, [*rel, entry.name])
        for entry in subdirs:
            sub_rel = [*rel, entry.name]
            if self.pattern is not None and not _could_match(sub_rel, self.pattern):
                continue
            sub_real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
            if sub_real in ancestors or sub_real == real:
                self.out.skipped.append(
                    Skipped(entry.path, "symlink_loop", f"a symlink to {sub_real}, a directory above it")
                )
            elif sub_real in self.seen_dirs:
                self.out.skipped.append(
                    Skipped(entry.path, "seen_twice", f"the directory {self.seen_dirs[sub_real]} again")
                )
            else:
                self.directory(entry.path, sub_real, sub_rel, (*ancestors, real))

    def _names_hidden(self, rel: list[str]) -> bool:
        return self.pattern is not None and len(rel) < len(self.pattern) and self.pattern[len(rel)][:1] == "."

    def _file(self, entry: os.DirEntry, real_dir: str, rel: list[str]) -> None:
        if self.pattern is not None and not _match(rel, self.pattern):
            return
        if self.pattern is None and self.extensions is not None:
            if os.path.splitext(entry.name)[1].lower() not in self.extensions:
                return
        if entry.is_symlink():
            if not os.path.exists(entry.path):  # dangling: its reader reports it as unreadable
                self.out.files.append(entry.path)
                return
            real = os.path.realpath(entry.path)
        else:
            real = os.path.join(real_dir, entry.name)
        if not entry.is_file():  # no stat for a regular file: the directory listing says what it is
            try:
                mode = entry.stat().st_mode
            except OSError:
                mode = 0
            self.out.skipped.append(Skipped(entry.path, "not_regular", _file_type(mode)))
        elif real in self.seen_files:
            self.out.skipped.append(
                Skipped(entry.path, "seen_twice", f"the file {self.seen_files[real]} again")
            )
        else:
            self.seen_files[real] = entry.path
            self.out.files.append(entry.path)


def _glob(name: str, pattern: str) -> Resolved:
    """A glob, resolved by :class:`_Walk` from its last directory without glob characters (``**``: any
    number of directories), so symlinks are followed with the same loop detection as a directory walk."""
    parts = pattern.split(os.sep)
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    top = os.sep.join(parts[:fixed]) or ("/" if pattern.startswith(os.sep) else "")
    walk = _Walk(name, None, parts[fixed:])
    base = top or "."
    if os.path.isdir(base):
        walk.directory(base, os.path.realpath(base), [])
    out = walk.out
    if not top:  # a relative glob returns relative paths, as glob.glob does
        out.files = [f.removeprefix("." + os.sep) for f in out.files]
    out.files.sort()
    if not out.files and not any(s.kind == "not_regular" for s in out.skipped):
        out.skipped.append(Skipped(name, "not_found", "the glob matched no file"))
    return out


def _match(parts: list[str], pattern: list[str]) -> bool:
    """Whether path parts match glob parts (``**`` matches zero or more parts)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def _could_match(parts: list[str], pattern: list[str]) -> bool:
    """Whether something below the directory ``parts`` can match ``pattern``."""
    if not parts:
        return True
    if not pattern:
        return False
    if pattern[0] == "**":
        return True
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _could_match(parts[1:], pattern[1:])
