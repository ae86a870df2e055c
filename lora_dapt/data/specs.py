"""Dataset specs and mixtures as a config writes them: their shape and checks (loading is :mod:`.hf`'s job).

A **source** (an item of ``data.sources``, ``eval_sources``, ``replay_sources`` or of a mixture component's
``sources``) is a path, glob or directory string, or a mapping read by ``datasets``::

    {hf: NAME_OR_DIR, split: train, name: null, data_files: null, text_field: null, streaming: false}

``hf`` is a hub name (needs the network), a local directory of data files (.jsonl, .parquet, .csv, .txt:
``datasets`` picks the builder), a ``save_to_disk`` directory, or a builder (``json``, ``parquet``, a local
script) with ``data_files``. ``text_field`` overrides ``data.text_field`` for this source; ``streaming``
reads rows one by one (:mod:`.hf`).

A **mixture** (``data.mixture``) is a list of components ``{name, sources, weight}``; weights are relative
(normalised to fractions of the training tokens). :mod:`.mixture` says how the fractions are met.

This module imports nothing heavy, so :mod:`lora_dapt.config` can check specs while it is being built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._sections import short_repr, unknown_name
from ..errors import ConfigError

SPEC_KEYS = ("hf", "split", "name", "data_files", "text_field", "streaming")
"""The keys of a datasets spec mapping."""


COMPONENT_KEYS = ("name", "sources", "weight")
"""The keys of a ``data.mixture`` component."""


_SPEC_FORM = "{hf: NAME_OR_DIR, split: train, text_field: text, streaming: false}"


@dataclass(frozen=True)
class HFSpec:
    """A source that ``datasets`` loads (see the module docstring for each field)."""

    hf: str
    split: str = "train"
    name: str | None = None
    data_files: str | list[str] | dict[str, Any] | None = None
    text_field: str | None = None
    streaming: bool = False

    @property
    def label(self) -> str:
        """How reports name this source and its rows: ``hf:NAME[/config][split]``."""
        config = f"/{self.name}" if self.name else ""
        return f"hf:{self.hf}{config}[{self.split}]"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SPEC_KEYS}


def is_spec(value: Any) -> bool:
    """Whether a source is a datasets spec mapping (rather than a path, a dataset or texts)."""
    return isinstance(value, Mapping)


def spec_problems(value: Mapping[Any, Any], key: str) -> list[str]:
    """Problem lines for a datasets spec mapping at config key ``key`` (empty: it is fine).

    >>> spec_problems({"hf": "data/", "splt": "train"}, "data.sources[0]")
    ["data.sources[0].splt: unknown key; did you mean 'split'?"]
    """
    out = [
        unknown_name(f"{key}.{k}", k, list(SPEC_KEYS), "key", "a datasets spec has ")
        for k in value
        if k not in SPEC_KEYS
    ]
    hf = value.get("hf")
    if not (isinstance(hf, str) and hf.strip()):
        shown = "missing" if hf is None else f"= {short_repr(hf)}"
        out.append(
            f"{key}.hf {shown}: give a hub dataset name, a local directory of data files or a save_to_disk "
            f"directory, e.g. {_SPEC_FORM}"
        )
    for k in ("split", "name", "text_field"):
        v = value.get(k)
        if v is not None and not (isinstance(v, str) and v):
            out.append(f"{key}.{k} = {short_repr(v)}: expected a non-empty string or null")
    files = value.get("data_files")
    if files is not None and not _data_files_ok(files):
        out.append(
            f"{key}.data_files = {short_repr(files)}: expected a path or glob, a list of them, or a mapping "
            "split -> paths (as datasets.load_dataset takes)"
        )
    streaming = value.get("streaming", False)
    if not isinstance(streaming, bool):
        out.append(f"{key}.streaming = {short_repr(streaming)}: expected true or false")
    return out


def _data_files_ok(files: Any) -> bool:
    def paths(v: Any) -> bool:
        return isinstance(v, str) or (isinstance(v, list) and bool(v) and all(isinstance(p, str) for p in v))

    if isinstance(files, Mapping):
        return bool(files) and all(isinstance(k, str) and paths(v) for k, v in files.items())
    return paths(files)


def parse_spec(value: Mapping[Any, Any], key: str = "source") -> HFSpec:
    """The :class:`HFSpec` of a spec mapping; a ``ConfigError`` naming every problem otherwise."""
    problems = spec_problems(value, key)
    if problems:
        raise ConfigError(problems)
    return HFSpec(**{k: value[k] for k in SPEC_KEYS if value.get(k) is not None})


def source_problems(items: Sequence[Any], key: str) -> list[str]:
    """Problem lines for a list of sources at config key ``key`` (``data.sources`` and the like).

    Paths (str, os.PathLike) and spec mappings are what a YAML config holds; from Python, ``datasets``
    objects and lists of texts are accepted too (duck-typed by ``column_names``, so this stays light).
    """
    out: list[str] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if isinstance(item, (str, os.PathLike)):
            if not str(item).strip():
                out.append(f"{where} = {short_repr(item)}: an empty path; give a file, glob or directory")
        elif is_spec(item):
            out += spec_problems(item, where)
        elif hasattr(item, "column_names") or (
            isinstance(item, (list, tuple)) and all(isinstance(s, str) for s in item)
        ):
            continue
        else:
            out.append(
                f"{where} = {short_repr(item)}: expected a path, glob or directory, or a datasets spec "
                f"mapping {_SPEC_FORM}"
            )
    return out


def mixture_problems(mixture: Sequence[Any], key: str = "data.mixture") -> list[str]:
    """Problem lines for ``data.mixture``: each component a mapping {name, sources, weight}, names unique,
    weights > 0, sources checked like ``data.sources``.

    >>> mixture_problems([{"name": "law", "sources": ["law/"], "weight": 0}])
    ['data.mixture[0].weight = 0: must be a number > 0 (weights are relative: 0.7 and 0.3, or 7 and 3)']
    """
    out: list[str] = []
    names: dict[str, int] = {}
    for i, comp in enumerate(mixture):
        where = f"{key}[{i}]"
        if not isinstance(comp, Mapping):
            out.append(
                f"{where} = {short_repr(comp)}: expected a mapping {{name: ..., sources: [...], weight: ...}}"
            )
            continue
        out += [
            unknown_name(f"{where}.{k}", k, list(COMPONENT_KEYS), "key", "a mixture component has ")
            for k in comp
            if k not in COMPONENT_KEYS
        ]
        name = comp.get("name")
        if not (isinstance(name, str) and name.strip()):
            out.append(
                f"{where}.name = {short_repr(name)}: give the component a name (e.g. 'law', 'general')"
            )
        elif name in names:
            out.append(f"{where}.name = {name!r}: the name of component {names[name]} too; names must differ")
        else:
            names[name] = i
        weight = comp.get("weight")
        if not (
            isinstance(weight, (int, float))
            and not isinstance(weight, bool)
            and math.isfinite(weight)
            and weight > 0
        ):
            out.append(
                f"{where}.weight = {short_repr(weight)}: must be a number > 0 (weights are relative: 0.7 and "
                "0.3, or 7 and 3)"
            )
        sources = comp.get("sources")
        if isinstance(sources, (str, os.PathLike)) or is_spec(sources):
            sources = [sources]
        if not isinstance(sources, (list, tuple)) or not sources:
            out.append(
                f"{where}.sources = {short_repr(sources)}: give a list of paths, globs, directories or "
                "datasets specs"
            )
        else:
            out += source_problems(sources, f"{where}.sources")
    return out
