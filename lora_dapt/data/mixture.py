"""The training mix: several components (domains, general replay) at stated fractions of the training tokens.

``data.mixture: [{name, sources, weight}, ...]`` names the components; ``data.sources`` with
``replay_fraction`` / ``replay_sources`` is its short form, two components ``domain`` (weight
``1 - replay_fraction``) and ``replay`` (weight ``replay_fraction``), built by :func:`plan_components` and
mixed by the same :func:`mix_components`. Weights are relative; they are normalised to fractions.

How the fractions are met (the decisions, and their trade-offs):

* **The first component is the domain.** It is read, cleaned and split like ``data.sources`` always was:
  the eval split is held out from it by document (``eval_fraction``), or ``eval_sources`` are the eval
  split. The other components are training-only; their documents identical to an eval document are
  dropped (``in_eval``), so no component leaks eval text into training. A mixture of several domains is
  therefore evaluated on its first component; put the domain you measure first, or give ``eval_sources``.
* **Every component gets exactly its share** (within one token; far within one block). The mixture is as
  large as the component with the fewest tokens for its weight allows: normally the domain, used whole,
  with each other component sampled to ``domain_tokens * w_i / w_domain``. A component holding fewer tokens
  than its share (a small general set asked for 50%) is used whole, and then every other component, the
  domain included, is sampled down to keep the fractions: a warning says which component limits the mix
  and how many tokens of each are left out, and ``CorpusStats.mixture`` records it (``limiting``,
  ``available_tokens``, ``unused_tokens``). Nothing is repeated: upsampling a small set would train on
  the same text several times per epoch without saying so; lower its weight, or add text, instead.
* Sampling is by whole documents in a seeded order (``data.seed``), the last one cut to fit the share.
  Only about as many documents as a share needs are tokenized (its characters at the domain's tokens per
  character, x1.5 + 64 documents of margin; all of them when that was too few).
* Cleaning: every component is cleaned with the same ``data`` settings (exact and near duplicates within
  the component, ``min_chars``); the problems of its files (not found, binary, ...) are counted in
  ``CorpusStats.problems`` like the domain's, its drops in its :class:`~.stats.ComponentStats`.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .clean import _select_documents, _Tally
from .pieces import piece_lengths, select_replay, tokenize_documents
from .sources import as_source_list, read_documents
from .stats import DROPS, PROBLEMS, ComponentStats, CorpusStats

log = logging.getLogger("lora_dapt")


@dataclass(frozen=True)
class Component:
    """One part of the training mix."""

    name: str
    sources: list[Any]
    weight: float
    """Fraction of the training tokens (normalised)."""
    key: str
    """The config key it came from, for messages: 'data.mixture[1]', 'data.replay_sources'."""


def plan_components(
    sources: Sequence[Any] | None, replay_sources: Sequence[Any] | None, cfg: DataConfig
) -> list[Component]:
    """The components of the training mix: ``cfg.mixture``, or the domain ``sources`` (argument, else
    ``cfg.sources``) and, with ``replay_fraction`` > 0, the replay sources (argument, else
    ``cfg.replay_sources``).

    >>> [(c.name, c.weight) for c in plan_components(["law/"], ["wiki/"], DataConfig(replay_fraction=0.25,
    ...     replay_sources=["x"]))]
    [('domain', 0.75), ('replay', 0.25)]

    Raises:
        DataError: no sources at all, sources given both as an argument and as ``data.mixture``, or
            ``replay_fraction`` without replay sources.
    """
    src = as_source_list(sources) if sources is not None else list(cfg.sources)
    rp_src = as_source_list(replay_sources) if replay_sources is not None else list(cfg.replay_sources)
    if cfg.mixture:
        if src or (replay_sources is not None and rp_src):
            raise DataError(
                "sources (or replay_sources) given together with data.mixture: pass sources=None and put "
                "every source in a mixture component, or drop data.mixture"
            )
        total = sum(float(c["weight"]) for c in cfg.mixture)
        return [
            Component(
                str(c["name"]),
                as_source_list(c["sources"]),
                float(c["weight"]) / total,
                f"data.mixture[{i}] ({c['name']})",
            )
            for i, c in enumerate(cfg.mixture)
        ]
    if not src:
        raise DataError(
            "no sources given: pass files, globs, directories or datasets (data.sources, or data.mixture)"
        )
    if cfg.replay_fraction <= 0:
        return [Component("domain", src, 1.0, "data.sources")]
    if not rp_src:
        raise DataError(f"replay_fraction = {cfg.replay_fraction} but no replay sources: give replay_sources")
    f = cfg.replay_fraction
    return [
        Component("domain", src, 1 - f, "data.sources"),
        Component("replay", rp_src, f, "data.replay_sources"),
    ]


@dataclass
class _Part:
    """A component other than the first while it is being mixed."""

    comp: Component
    pieces: datasets.Dataset
    tokens: int
    """Tokens in ``pieces`` (all the component's documents, or at least its share)."""
    whole: bool
    """``pieces`` hold every document of the component."""
    stats: ComponentStats


def mix_components(
    domain: datasets.Dataset,
    components: list[Component],
    eval_docs: datasets.Dataset,
    tokenizer: Any,
    cfg: DataConfig,
    special: tuple[int | None, int | None],
    work: Path,
    stats: CorpusStats,
) -> datasets.Dataset:
    """The training pieces of the whole mix: ``domain`` (the first component's pieces, counted in ``stats``
    already) and every other component at its fraction (see the module docstring); fills
    ``stats.mixture`` and the replay and token counts."""
    bos, eos = special
    first = components[0]
    d_tokens = stats.train_tokens
    eval_hashes = set(eval_docs["hash"]) if len(eval_docs) else set()
    parts = []
    for i, comp in enumerate(components[1:], start=1):
        need = math.ceil(d_tokens * comp.weight / first.weight)
        parts.append(_read_part(i, comp, need, eval_hashes, tokenizer, cfg, bos, eos, work, stats))
    # the component with the fewest tokens for its weight sets the size (the domain unless one is short)
    ratios = [d_tokens / first.weight] + [p.tokens / p.comp.weight if p.whole else math.inf for p in parts]
    j = int(np.argmin(ratios))
    base, base_weight = (
        (d_tokens, first.weight) if j == 0 else (parts[j - 1].tokens, parts[j - 1].comp.weight)
    )
    d_target = d_tokens if j == 0 else min(d_tokens, math.ceil(base * first.weight / base_weight))
    first_stats = ComponentStats(
        first.name,
        first.weight,
        available_tokens=d_tokens,
        limiting=j == 0,
        documents_read=stats.documents_read,
        dropped=dict(stats.dropped),
    )
    if d_target < d_tokens:
        domain, d_docs = _sample(domain, d_target, cfg.seed)
        stats.special_tokens -= (int(stats.add_bos) + int(stats.add_eos)) * (stats.train_documents - d_docs)
    else:
        d_docs = stats.train_documents
    first_stats.tokens, first_stats.documents = d_target, d_docs
    out, mix = [domain], [first_stats]
    for k, p in enumerate(parts, start=1):
        target = p.tokens if k == j else min(p.tokens, math.ceil(base * p.comp.weight / base_weight))
        pieces, got, n_docs = select_replay(p.pieces, target)
        p.stats.tokens, p.stats.documents, p.stats.limiting = got, n_docs, k == j
        stats.special_tokens += (int(stats.add_bos) + int(stats.add_eos)) * n_docs
        out.append(pieces)
        mix.append(p.stats)
    stats.train_tokens = sum(c.tokens for c in mix)
    stats.replay_tokens = sum(c.tokens for c in mix[1:])
    stats.replay_documents = sum(c.documents for c in mix[1:])
    for c in mix:
        c.fraction = c.tokens / stats.train_tokens if stats.train_tokens else 0.0
    stats.mixture = mix
    if j > 0:
        left = ", ".join(f"{c.name} {c.unused_tokens:,}" for c in mix if c.unused_tokens)
        log.warning(
            "mixture: %s holds %d tokens, fewer than its share %.1f%% needs next to the others; it is used "
            "whole and the other components are sampled down to keep the fractions (tokens left out: %s). "
            "Lower its weight or add text to use more of the others",
            mix[j].name,
            mix[j].tokens,
            100 * mix[j].weight,
            left or "none",
        )
    return datasets.concatenate_datasets(out)


def _tag(i: int, name: str) -> str:
    """The name a component's files and in-memory sources get in reports ('replay', 'general', 'mix2')."""
    return (
        name if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name) and name not in ("domain", "eval") else f"mix{i}"
    )


def _read_part(
    i: int,
    comp: Component,
    need: int,
    eval_hashes: set[bytes],
    tokenizer: Any,
    cfg: DataConfig,
    bos: int | None,
    eos: int | None,
    work: Path,
    stats: CorpusStats,
) -> _Part:
    """Read, clean and tokenize (about ``need`` tokens of) the component ``comp``; counts its problems."""
    tag = _tag(i, comp.name)
    docs = read_documents(comp.sources, cfg, work, tag)
    tally = _Tally()
    idx, n_read = _select_documents(docs, cfg, tally, drop_hashes=eval_hashes)
    files = tally.counts.pop("file_read", 0)
    tally.examples.pop("file_read", None)
    tally.counts.pop("normalized", None)
    stats.files_read += files
    for k, n in tally.counts.items():
        if k in DROPS or not n:
            continue
        stats.problems[k] = stats.problems.get(k, 0) + n
        stats.examples.setdefault(k, []).extend(
            tally.examples.get(k, [])[: 10 - len(stats.examples.get(k, []))]
        )
        log.warning("%s: %d %s, e.g. %s", comp.name, n, PROBLEMS.get(k, k), ", ".join(tally.examples[k][:3]))
    if not idx:
        found = "; ".join(f"{n} {PROBLEMS.get(k, DROPS.get(k, k))}" for k, n in tally.counts.items() if n)
        names = ", ".join(str(s)[:80] if isinstance(s, str) else type(s).__name__ for s in comp.sources[:3])
        fix = "set data.replay_fraction to 0" if comp.key == "data.replay_sources" else "remove the component"
        raise DataError(
            f"{comp.key} ({names}) hold no usable document ({found or 'nothing found'}): check the paths, or "
            f"{fix}"
        )
    random.Random(cfg.seed + i).shuffle(idx)
    chars = np.asarray(docs.data.column("chars").to_numpy())[idx]
    budget = need / max(stats.tokens_per_char, 1e-3) * 1.5
    n_take = min(len(idx), int(np.searchsorted(np.cumsum(chars), budget)) + 64)
    pieces = tokenize_documents(
        docs.select(idx[:n_take]), tokenizer, cfg, bos, eos, work / f"{tag}-pieces.arrow", f"tokenizing {tag}"
    )
    tokens = int(piece_lengths(pieces).sum())
    if tokens < need and n_take < len(idx):  # the estimate was short: tokenize every document
        n_take = len(idx)
        pieces = tokenize_documents(
            docs.select(idx), tokenizer, cfg, bos, eos, work / f"{tag}-all-pieces.arrow", f"tokenizing {tag}"
        )
        tokens = int(piece_lengths(pieces).sum())
    whole = n_take == len(idx)
    comp_stats = ComponentStats(
        comp.name,
        comp.weight,
        available_tokens=tokens if whole else None,
        documents_read=n_read,
        dropped={k: tally.counts.get(k, 0) for k in DROPS if tally.counts.get(k, 0)},
    )
    return _Part(comp, pieces, tokens, whole, comp_stats)


def _sample(pieces: datasets.Dataset, target: int, seed: int) -> tuple[datasets.Dataset, int]:
    """The domain's pieces cut down to ``target`` tokens: whole documents in a seeded order (a document's
    pieces stay together and in order), the last one cut. Returns (pieces, documents touched)."""
    docs = np.asarray(pieces.data.column("doc").to_numpy())
    ids = np.unique(docs)
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    by_doc = np.argsort(rank[np.searchsorted(ids, docs)], kind="stable")
    chosen, _, n_docs = select_replay(pieces.select(by_doc), target)
    return chosen, n_docs
