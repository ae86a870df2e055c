"""Loading a datasets spec (:class:`~.specs.HFSpec`) with ``datasets``, and fingerprinting it for the cache.

* ``hf`` naming a ``save_to_disk`` directory (it holds ``state.json`` or ``dataset_dict.json``) is read with
  ``datasets.load_from_disk`` (a ``DatasetDict``: the spec's ``split``); anything else goes to
  ``datasets.load_dataset(hf, name, split=..., data_files=..., streaming=...)``: a local directory of data
  files, a builder (``json``, ``parquet``, ``csv``, ``text`` or a local script) or a hub name. A hub name
  needs the network; offline (or with ``HF_DATASETS_OFFLINE=1`` and nothing cached) it is a ``DataError``
  saying so and how to use local data instead.
* Streaming (``streaming: true``) gives an ``IterableDataset``: rows arrive one by one and
  :func:`~.sources.read_documents` writes them to an Arrow file on disk as they come (1,000 rows at a time),
  so a source larger than memory is never held whole; tokenizing and packing then work in batches from
  that memory-mapped file, as for any corpus.
* Cache key (:func:`describe_spec`): the spec itself plus the size and mtime of every local file it reads
  (the directory's files, ``data_files``), computed without loading anything, so a streaming source is
  cached like a file. A hub dataset is keyed by name, config and split only: a new revision on the hub is
  not noticed; prepare with ``prepare_corpus(..., use_cache=False)`` or another ``data.cache_dir`` to read
  it again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError
from .resolve import resolve_path
from .specs import HFSpec

__all__ = ["describe_spec", "load_spec"]


def _local(spec: HFSpec) -> Path | None:
    path = Path(os.path.expanduser(spec.hf))
    return path if path.exists() else None


def _saved(path: Path | None) -> bool:
    return path is not None and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def load_spec(
    spec: HFSpec, cache_dir: str | os.PathLike | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """The dataset a spec names (see the module docstring); ``cache_dir``: where ``load_dataset`` keeps the
    Arrow files it builds (default: the datasets cache).

    Raises:
        DataError: the dataset cannot be loaded (not found, offline, no such split or config), with the
            spec's label and what to change.
    """
    local = _local(spec)
    if _saved(local):
        return _from_disk(spec, local)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"split": spec.split, "streaming": spec.streaming}
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    try:
        return datasets.load_dataset(str(local) if local else spec.hf, spec.name, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, datasets.exceptions.DatasetsError) as e:
        raise DataError(_load_failed(spec, local, e)) from e


def _from_disk(spec: HFSpec, path: Path) -> datasets.Dataset | datasets.IterableDataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{spec.label}: cannot read the save_to_disk directory {path}: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise DataError(
                f"{spec.label}: the saved dataset has no split '{spec.split}' (it has "
                f"{', '.join(loaded)}): set split to one of them"
            )
        loaded = loaded[spec.split]
    return loaded.to_iterable_dataset() if spec.streaming else loaded


def _load_failed(spec: HFSpec, local: Path | None, e: Exception) -> str:
    why = f"{type(e).__name__}: {e}"[:400]
    if local is None and isinstance(e, ConnectionError):
        return (
            f"{spec.label}: cannot reach '{spec.hf}' on the Hugging Face Hub ({why}). A hub name needs the "
            "network (or a copy in the datasets cache with HF_DATASETS_OFFLINE=1); offline, point hf at a "
            "local directory of .jsonl/.parquet/.csv/.txt files or a save_to_disk directory"
        )
    if local is None and isinstance(e, FileNotFoundError):
        return (
            f"{spec.label}: no local directory '{spec.hf}' and no such dataset on the hub ({why}). Check the "
            "path (relative to the working directory) or the hub name"
        )
    return f"{spec.label}: datasets.load_dataset failed ({why}); check hf, split, name and data_files"


def describe_spec(spec: HFSpec) -> list[Any]:
    """A cache-key description of a spec: its fields and (size, mtime) of the local files it reads."""
    local = _local(spec)
    roots = [local] if local is not None else []
    files = spec.data_files
    patterns = (
        [files]
        if isinstance(files, str)
        else list(files)
        if isinstance(files, list)
        else [p for v in files.values() for p in ([v] if isinstance(v, str) else v)]
        if isinstance(files, dict)
        else []
    )
    for pattern in patterns:
        roots.append(Path(pattern))
        if local is not None and local.is_dir():
            roots.append(local / pattern)
    stamps = []
    for root in roots:
        for f in resolve_path(root).files:
            try:
                st = os.stat(f)
                stamps.append((f, st.st_size, st.st_mtime_ns))
            except OSError:
                stamps.append((f, None, None))
    return ["hf", spec.to_dict(), sorted(set(stamps), key=str)]
