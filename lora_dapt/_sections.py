"""The machinery behind the config sections of :mod:`lora_dapt.config` (which holds the dataclasses).

:class:`Section` gives a dataclass type checks with YAML-friendly coercion (``1e-4`` read as a string becomes
a float), value checks collected into one :class:`~lora_dapt.errors.ConfigError`, unknown keys with a
suggestion, dict round trips, and its field docstrings (read from the source, so each field is documented
once, where it is declared).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import math
import reprlib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError
from .synonyms import suggest


def default_of(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (a fresh one for a default_factory)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


REPR_CHARS = 120
"""The longest a value is shown in a config message (a YAML alias bomb must not build a 300 MB message)."""


INT_LIMIT = 2**63 - 1
"""The largest integer a config value may be (what torch, numpy and the tokenizers can hold)."""


def short_repr(value: Any, limit: int = REPR_CHARS) -> str:
    """``repr(value)`` bounded in depth, items and length: what every config message shows of a value.

    >>> short_repr("x" * 500)[:12], len(short_repr(list(range(10**6)))) <= REPR_CHARS
    ("'xxxxxxxxxxx", True)
    """
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, limit, limit, 40
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 8
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_name(
    label: str, key: Any, known: Sequence[str], kind: str, listing: str, *, section: str | None = None
) -> str:
    """The problem line for an unknown key: where lora_dapt keeps it (another tool's name, or one of our
    keys in the wrong place: :func:`lora_dapt.synonyms.suggest`, asked when ``section`` says where the key
    was met, '' for a config's top level), else the closest known name, or all of them when none is close.

    >>> unknown_name("train.lerning_rate", "lerning_rate", ["learning_rate", "seed"], "key", "known keys: ")
    "train.lerning_rate: unknown key; did you mean 'learning_rate'?"
    """
    key = str(key)[:REPR_CHARS]
    where = suggest(key, section) if section is not None else None
    guess = difflib.get_close_matches(key, list(known), n=1)
    if where:
        hint = f"; {where}"
    elif guess:
        hint = f"; did you mean '{guess[0]}'?"
    else:
        hint = f"; {listing}{', '.join(known)}"
    label = label if len(label) <= REPR_CHARS else short_repr(label)
    return f"{label}: unknown {kind}{hint}"


def type_name(tp: Any) -> str:
    """A type hint as an error message names it: ``'cosine' | 'linear'``, ``int | null``, ``list of str``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, coerced value) for ``value`` against type hint ``tp``.

    Lenient where a YAML user would expect it: ``1e-4`` (which YAML 1.1 reads as a string) becomes a float,
    an int is accepted for a float, a single string for a list of strings.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            return (type(None) in args), None
        for a in args:  # an exact match wins: "all-linear" stays a str for `str | list[str]`
            if isinstance(a, type) and typing.get_origin(a) is None and type(value) is a:
                return True, value
        # try non-str alternatives first so "5" can become 5 for int | str only when str is not an option
        for a in sorted(args, key=lambda a: a is str):
            if a is type(None):
                continue
            ok, v = coerce(value, a)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return (value in typing.get_args(tp)), value
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, (str, Path)) and inner in (str, Any):
            return True, [str(value)]
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for item in value:
            ok, v = coerce(item, inner)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return abs(value) <= INT_LIMIT, value
        if isinstance(value, float) and value.is_integer() and abs(value) <= INT_LIMIT:
            return True, int(value)
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        if isinstance(value, Path):
            return True, str(value)
        return isinstance(value, str), value
    if tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to the docstring written under it in the source.

    A subclass inherits the docs of the fields it does not document again (SFTConfig's learning_rate is
    TrainConfig's field with another default).
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - source not available (frozen app)
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


class Section:
    """Mixin for config dataclasses: build from a dict with checks, check values, dump to a dict."""

    _section = ""  # name of this section inside RunConfig, used in error messages

    def __post_init__(self) -> None:
        problems, wrong = self._type_problems()
        checked = self
        if wrong:
            # Value checks assume the declared types: run them on a copy whose wrongly typed fields (already
            # reported) hold their defaults, so every other field's value problems are still listed.
            checked = copy.copy(self)
            for f in dataclasses.fields(self):
                if f.name in wrong:
                    object.__setattr__(checked, f.name, default_of(f))
        problems += checked.problems()
        if problems:
            raise ConfigError(problems)

    # -- checks ------------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def _type_problems(self) -> tuple[list[str], set[str]]:
        """Coerce every field to its declared type; (problem lines, names of the fields that could not be)."""
        out, wrong = [], set()
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            ok, coerced = coerce(value, hints[f.name])
            if ok:
                object.__setattr__(self, f.name, coerced)
            else:
                tp = type_name(hints[f.name])
                if isinstance(value, int) and not isinstance(value, bool) and "int" in tp:
                    tp += f" (at most {INT_LIMIT:,})"
                out.append(f"{self._key(f.name)} = {short_repr(value)}: expected {tp}")
                wrong.add(f.name)
        return out, wrong

    def problems(self) -> list[str]:
        """Value checks beyond types; each subclass lists its own. Returns readable problem lines."""
        return []

    def _check(self, out: list[str], cond: bool, name: str, allowed: str) -> None:
        if not cond:
            out.append(f"{self._key(name)} = {short_repr(getattr(self, name))}: {allowed}")

    # -- dict / YAML -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Any:
        """Build from a plain dict, naming unknown keys (with a suggestion) and every bad value at once."""
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        prefix = f"{cls._section}." if cls._section else ""
        problems = []
        for key in list(data):
            if key not in names:
                problems.append(
                    unknown_name(
                        f"{prefix}{key}", key, names, "key", "known keys: ", section=cls._section or None
                    )
                )
                del data[key]
        try:
            obj = cls(**data)
        except ConfigError as e:
            raise ConfigError(problems + e.problems) from None
        except TypeError as e:  # a required field is missing
            raise ConfigError(problems + [f"{prefix.rstrip('.') or cls.__name__}: {e}"]) from None
        if problems:
            raise ConfigError(problems)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.name.startswith("_")
        }

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (checked like the original)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def positive(x: float | int | None) -> bool:
    return x is None or (isinstance(x, (int, float)) and x > 0 and math.isfinite(x))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested config dict (copied)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(
                f"--set {short_repr(item)}: expected section.key=value, e.g. train.learning_rate=1e-4"
            )
            continue
        section, name = parts
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            problems.append(f"--set {short_repr(item)}: the value is nested too deeply to read")
            continue
        node = out.setdefault(section, {})
        if not isinstance(node, dict):
            problems.append(f"--set {short_repr(item)}: section {short_repr(section)} is not a mapping")
            continue
        node[name] = value
    if problems:
        raise ConfigError(problems)
    return out


def describe_section(name: str, cls: type) -> list[str]:
    """``name:`` and every field of section ``cls`` with its default (as YAML) and its docstring."""
    lines = [f"{name}:  # {cls.__doc__.strip().splitlines()[0]}"]
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        default = yaml.safe_dump(default_of(f), default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {f.name}: {default}")
        if f.name in docs:
            lines.append(f"      # {docs[f.name]}")
    return lines
