"""Documents -> token pieces -> packed blocks, as Arrow files on disk (the token half of prepare_corpus).

* Tokenizing: each document's ids get BOS (first part) and EOS (last part) added by hand, so the special
  token counts are exact, and are cut into *pieces* of at most ``seq_len`` tokens (``cut`` marks the pieces
  of a document that needed several). A fast tokenizer encodes the next batch in a worker thread (its Rust
  backend releases the GIL and uses every core) while this thread cuts and writes the previous one; a
  Python tokenizer runs as a ``datasets`` map over ``num_proc`` processes.
* Packing: batches of pieces go through :func:`lora_dapt.data.packing._pack_arrays` (best-fit decreasing,
  gap filling for long documents) in this process; the number of gap-filling cuts is summed here and
  returned, so padding is only the slack of each batch's last blocks.
* Replay: :func:`select_replay` takes the first pieces of a seeded order up to a token budget.
* Bytes: every piece and block carries the UTF-8 bytes of text it covers (a document's bytes shared out over
  its pieces by tokens; exact in total), so packed evaluation reports bits per byte.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from ..config import DataConfig
from . import packing

_TOKENIZE_BATCH = 256  # documents per tokenizer call (parts are <= 1M chars, so <= ~256 MB per batch)


_PACK_BATCH = 2048  # pieces (<= seq_len tokens each) per packing batch


PIECE_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "doc": datasets.Value("int64"),
        "cut": datasets.Value("bool"),  # the document was cut into several pieces (gap filling may cut more)
        "bytes": datasets.Value("int64"),  # UTF-8 bytes of text the piece covers (packing.share_bytes)
    }
)


BLOCK_FEATURES = datasets.Features(
    {
        **{c: datasets.Sequence(datasets.Value("int32")) for c in ("input_ids", "position_ids", "labels")},
        "bytes": datasets.Value("int64"),
    }
)
"""Columns of a packed block: int lists of exactly ``seq_len``, and the UTF-8 bytes of text the block covers
(what ``evaluate_blocks`` divides by for bits per byte)."""


def utf8_bytes(texts: Sequence[str]) -> list[int]:
    """UTF-8 bytes of each text, as the scorer counts them (lone surrogates count as 3 bytes, not an error)."""
    return [len(t.encode("utf-8", "surrogatepass")) for t in texts]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (fast tokenizers through their Rust backend)."""
    if getattr(tokenizer, "is_fast", False):
        return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pieces_table(
    ids_list: list[list[int]],
    parts: list[int],
    lasts: list[bool],
    idx: Sequence[int],
    seq_len: int,
    bos: int | None,
    eos: int | None,
    text_bytes: Sequence[int],
) -> pa.Table:
    """Documents' token ids -> pieces of at most seq_len tokens, special tokens added by hand so counts are
    exact (BOS on a document's first part, EOS on its last). ``text_bytes``: each document part's UTF-8
    bytes, shared out over its pieces by tokens (:func:`~lora_dapt.data.packing.share_bytes`)."""
    # Build the Arrow columns from one flat numpy buffer: converting millions of Python ints list by list
    # into Arrow was ~10% of prepare_corpus.
    lengths = [len(ids) for ids in ids_list]
    flat = np.fromiter(itertools.chain.from_iterable(ids_list), dtype=np.int32, count=sum(lengths))
    doc_lens = np.asarray(lengths, dtype=np.int64)
    first = np.asarray([bos is not None and part == 0 for part in parts], dtype=bool)
    final = np.asarray([eos is not None and bool(last) for last in lasts], dtype=bool)
    doc_lens = doc_lens + first + final
    total = int(doc_lens.sum())
    out = np.empty(total, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]]).astype(np.int64)
    src = 0
    for k, n in enumerate(lengths):
        o = starts[k]
        if first[k]:
            out[o] = bos
            o += 1
        out[o : o + n] = flat[src : src + n]
        src += n
        if final[k]:
            out[o + n] = eos
    # cut every document into pieces of at most seq_len tokens
    piece_lens, piece_docs, piece_cut, piece_of, piece_start = [], [], [], [], []
    for k, n in enumerate(doc_lens.tolist()):
        for s in range(0, n, seq_len):
            piece_lens.append(min(seq_len, n - s))
            piece_docs.append(idx[k])
            piece_cut.append(n > seq_len)
            piece_of.append(k)
            piece_start.append(s)
    of, start = np.asarray(piece_of, dtype=np.int64), np.asarray(piece_start, dtype=np.int64)
    piece_bytes = packing.share_bytes(
        np.asarray(text_bytes, dtype=np.int64)[of], doc_lens[of], start, start + np.asarray(piece_lens)
    )
    # documents lie in order in `out`, so consecutive pieces tile it and their lengths give the offsets
    plen = np.asarray(piece_lens, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(plen)]).astype(np.int32)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(out))
    return pa.table(
        {
            "input_ids": input_ids,
            "length": pa.array(plen, type=pa.int32()),
            "doc": pa.array(np.asarray(piece_docs, dtype=np.int64)),
            "cut": pa.array(piece_cut, type=pa.bool_()),
            "bytes": pa.array(piece_bytes.astype(np.int64)),
        }
    )


def _tokenize_batch(
    batch: dict[str, list[Any]],
    idx: list[int],
    tokenizer: Any,
    seq_len: int,
    bos: int | None,
    eos: int | None,
) -> pa.Table:
    """``datasets.map`` function (slow tokenizers): documents -> pieces."""
    ids_list = _encode(tokenizer, batch["text"])
    n_bytes = utf8_bytes(batch["text"])
    return _pieces_table(ids_list, batch["part"], batch["last"], idx, seq_len, bos, eos, n_bytes)


def tokenize_documents(
    docs: datasets.Dataset,
    tokenizer: Any,
    cfg: DataConfig,
    bos: int | None,
    eos: int | None,
    path: Path,
    desc: str,
) -> datasets.Dataset:
    """Documents -> an Arrow file of pieces (``input_ids``, ``length``, ``doc``: the row in ``docs``)."""
    if getattr(tokenizer, "is_fast", False):
        return _tokenize_fast(docs, tokenizer, cfg.seq_len, bos, eos, path, desc)
    # a Python tokenizer: datasets.map with num_proc processes
    return docs.map(
        _tokenize_batch,
        with_indices=True,
        batched=True,
        batch_size=_TOKENIZE_BATCH,
        remove_columns=docs.column_names,
        fn_kwargs={"tokenizer": tokenizer, "seq_len": cfg.seq_len, "bos": bos, "eos": eos},
        features=PIECE_FEATURES,
        num_proc=cfg.num_proc if cfg.num_proc > 1 and len(docs) >= 64 else None,
        cache_file_name=str(path),
        new_fingerprint=hashlib.sha256(str(path).encode()).hexdigest()[:16],
        desc=desc,
    )


def _tokenize_fast(
    docs: datasets.Dataset,
    tokenizer: Any,
    seq_len: int,
    bos: int | None,
    eos: int | None,
    path: Path,
    desc: str,
) -> datasets.Dataset:
    """A fast tokenizer encodes the next batch in a worker thread (Rust releases the GIL and spreads a batch
    over every core) while this thread turns the previous batch into pieces and writes them: the Python
    work hides behind the tokenizer instead of adding to it."""
    from concurrent.futures import ThreadPoolExecutor

    from datasets.arrow_writer import ArrowWriter

    from ..progress import progress

    cols = docs.select_columns(["text", "part", "last"])
    with (
        ThreadPoolExecutor(1, thread_name_prefix="lora_dapt-tokenize") as pool,
        ArrowWriter(features=PIECE_FEATURES, path=str(path)) as writer,
        progress(len(cols), desc, unit="doc", disable=len(cols) < 1000) as bar,
    ):
        pending = None
        start = 0

        def flush(job: tuple[Any, dict[str, list[Any]], int]) -> None:
            future, batch, first = job
            n = len(batch["part"])
            parts, lasts, n_bytes = batch["part"], batch["last"], batch["bytes"]
            table = _pieces_table(
                future.result(), parts, lasts, range(first, first + n), seq_len, bos, eos, n_bytes
            )
            writer.write_table(table)  # ArrowWriter casts to PIECE_FEATURES itself
            bar.update(n)

        for batch in cols.iter(batch_size=_TOKENIZE_BATCH):
            texts = batch.pop("text")
            future = pool.submit(_encode, tokenizer, texts)
            batch["bytes"] = utf8_bytes(texts)
            if pending is not None:
                flush(pending)
            pending = (future, batch, start)
            start += len(batch["part"])
        if pending is not None:
            flush(pending)
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def _pack_batch(batch: pa.Table, seq_len: int, pad_id: int) -> tuple[pa.Table, int]:
    """A batch of pieces -> a table of blocks, and the cuts made to fill gaps.

    The pieces are cut out of the flat token buffer as numpy views, without turning millions of token ids
    into Python ints and back; the blocks ([n, seq_len] arrays) become list columns the same way.
    """
    col = batch.column("input_ids").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False)
    offsets = col.offsets.to_numpy()
    pieces = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    splittable = batch.column("cut").to_pylist()
    n_bytes = batch.column("bytes").to_numpy()
    ids, pos, lab, _, cuts, block_bytes = packing._pack_arrays(
        pieces, seq_len, pad_id, splittable=splittable, byte_counts=n_bytes
    )
    rows = pa.array(np.arange(0, ids.size + 1, seq_len, dtype=np.int32))
    table = pa.table(
        {
            **{
                name: pa.ListArray.from_arrays(rows, pa.array(arr.astype(np.int32).ravel()))
                for name, arr in (("input_ids", ids), ("position_ids", pos), ("labels", lab))
            },
            "bytes": pa.array(block_bytes),
        }
    )
    return table, cuts


def pack_pieces(
    pieces: datasets.Dataset, seq_len: int, pad_id: int, path: Path, desc: str
) -> tuple[datasets.Dataset, int]:
    """Pieces -> blocks in the Arrow file ``path``; also returns the cuts made to fill gaps. One process:
    packing is numpy work on small batches, and one output file keeps the cache simple."""
    from datasets.arrow_writer import ArrowWriter

    from ..progress import progress

    cuts = 0
    with (
        ArrowWriter(features=BLOCK_FEATURES, path=str(path)) as writer,
        progress(len(pieces), desc, unit="piece", disable=len(pieces) < 10_000) as bar,
    ):
        for batch in pieces.with_format("arrow").iter(batch_size=_PACK_BATCH):
            table, n = _pack_batch(batch, seq_len, pad_id)
            writer.write_table(table)
            cuts += n
            bar.update(batch.num_rows)
        writer.finalize()
    return datasets.Dataset.from_file(str(path)), cuts


def piece_lengths(pieces: datasets.Dataset) -> np.ndarray:
    """Token count of every piece (int64)."""
    return np.asarray(pieces.data.column("length").to_numpy(), dtype=np.int64)


def select_replay(pieces: datasets.Dataset, target: int) -> tuple[datasets.Dataset, int, int]:
    """The first pieces (in the seeded replay order) up to ``target`` tokens, the last one cut to fit.

    Returns (pieces, tokens, documents touched).
    """
    lengths = piece_lengths(pieces)
    docs = np.asarray(pieces.data.column("doc").to_numpy())
    cum = np.cumsum(lengths)
    if len(cum) == 0 or cum[-1] <= target:
        return pieces, int(cum[-1]) if len(cum) else 0, len(np.unique(docs))
    k = int(np.searchsorted(cum, target, side="left"))  # pieces[0..k] reach the target
    chosen = pieces.select(range(k + 1))
    over = int(cum[k] - target)
    if over:
        row = chosen[k]
        last = row["input_ids"][: int(lengths[k]) - over]
        kept = packing.share_bytes(np.asarray([row["bytes"]]), lengths[k : k + 1], np.zeros(1), [len(last)])
        tail = datasets.Dataset.from_dict(
            {
                "input_ids": [last],
                "length": [len(last)],
                "doc": [row["doc"]],
                "cut": [row["cut"]],
                "bytes": [int(kept[0])],
            },
            features=PIECE_FEATURES,
        )
        chosen = datasets.concatenate_datasets([chosen.select(range(k)), tail]) if k else tail
    return chosen, target, len(np.unique(docs[: k + 1]))
