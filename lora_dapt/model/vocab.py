"""Grow a (4-bit or 16-bit) model's embeddings and head for new tokens, and initialise the new rows.

What happens on a 4-bit base: bitsandbytes quantizes only the decoder's linear layers. The input embeddings
stay an ``nn.Embedding`` and the output head an ``nn.Linear`` in the compute dtype (transformers keeps the
output embeddings out of quantization), so ``resize_token_embeddings`` works on them as on a 16-bit model
and the resized matrices are 16-bit too; the 4-bit layers are untouched. Tied weights stay one tensor
(transformers re-ties after resizing; checked here).

Rows:

* The matrices grow to a multiple of :data:`PAD_MULTIPLE` rows (kernels and tensor cores like it) when the
  tokenizer no longer fits; a model whose matrices already have spare rows (Qwen's) is not resized.
* Every row beyond the old ones starts as the mean of the old rows (input and head alike): deterministic,
  so the merge rebuilds the same padding rows from the base, and a padding row's logit is the average
  logit, so it takes no noticeable probability.
* A new token's input row and head row are then the mean of the rows of the tokens the OLD tokenizer spells
  it with (ChipNeMo's initialisation): the model starts out reading and predicting the new token roughly as
  it did its pieces, instead of from random rows (the NaNs and garbage others report).

Training then updates only the new tokens' rows (peft ``trainable_token_indices``: see
:func:`lora_dapt.model.lora.apply_lora`), so the adapter holds ``2 x new tokens x hidden`` numbers (one
copy when tied), not the matrices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .lora import tied_embeddings

log = logging.getLogger("lora_dapt")

PAD_MULTIPLE = 64
"""Embedding rows are padded to a multiple of this when they grow."""


@dataclass
class NewTokenRows:
    """What :func:`add_token_rows` did."""

    token_ids: list[int]
    """Ids of the new tokens (what trains)."""
    sub_tokens: dict[int, list[int]]
    """Each new token's pieces under the old tokenizer (its rows started as their mean)."""
    rows_before: int
    rows_after: int
    tied: bool
    """Input embeddings and head are one tensor (before and after)."""


def padded_rows(n_tokens: int, rows: int, multiple: int = PAD_MULTIPLE) -> int:
    """Embedding rows a model with ``rows`` rows needs for a tokenizer of ``n_tokens`` tokens.

    >>> padded_rows(330, 320), padded_rows(300, 320)
    (384, 320)
    """
    return rows if n_tokens <= rows else -(-n_tokens // multiple) * multiple


def grow_embeddings(model: Any, n_rows: int) -> int:
    """Resize input embeddings and head to ``n_rows`` rows (no-op when they have as many); the rows beyond
    the old ones start as the mean of the old rows. Returns the old row count."""
    emb = model.get_input_embeddings()
    old = int(emb.weight.shape[0])
    if n_rows <= old:
        return old
    tied = tied_embeddings(model)
    head = model.get_output_embeddings()
    in_mean = emb.weight.detach().float().mean(0)
    out_mean = head.weight.detach().float().mean(0) if head is not None and not tied else None
    # mean_resizing=False: we set the rows ourselves (transformers' mean resizing samples them from a
    # normal around the mean: random, and its covariance is hidden x hidden work)
    model.resize_token_embeddings(n_rows, mean_resizing=False)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        emb.weight[old:] = in_mean.to(emb.weight.dtype)
        if out_mean is not None:
            head.weight[old:] = out_mean.to(head.weight.dtype)
            if getattr(head, "bias", None) is not None:
                head.bias[old:] = 0
    if tied and not tied_embeddings(model):
        raise ConfigError("resizing untied the input embeddings and the head; this model cannot grow here")
    log.info("embeddings and head grown from %d to %d rows (new rows: the mean of the old)", old, n_rows)
    return old


def add_token_rows(model: Any, old_tokenizer: Any, new_tokenizer: Any) -> NewTokenRows:
    """Grow ``model`` for ``new_tokenizer`` (the old one plus new tokens) and initialise each new token's
    input and head rows as the mean of its sub-token rows under ``old_tokenizer``.

    Raises:
        ConfigError: the new tokenizer is not the old one with tokens appended (an old token's id moved).
    """
    n_old, n_new = len(old_tokenizer), len(new_tokenizer)
    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    moved = [t for t, i in old_vocab.items() if new_vocab.get(t) != i]
    if moved or n_new < n_old:
        raise ConfigError(
            f"the extended tokenizer must keep every old token's id and append new ones; {len(moved)} old "
            f"tokens moved (e.g. {moved[:3]}). Extend the model's own tokenizer (extend_vocabulary)"
        )
    ids = list(range(n_old, n_new))
    rows_before = int(model.get_input_embeddings().weight.shape[0])
    grow_embeddings(model, padded_rows(n_new, rows_before))
    tied = tied_embeddings(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    sub: dict[int, list[int]] = {}
    with torch.no_grad():
        for i in ids:
            text = new_tokenizer.decode([i], clean_up_tokenization_spaces=False)
            pieces = old_tokenizer(text, add_special_tokens=False)["input_ids"]
            if not pieces:
                continue
            sub[i] = pieces
            idx = torch.tensor(pieces, device=emb.weight.device)
            emb.weight[i] = emb.weight[idx].float().mean(0).to(emb.weight.dtype)
            if head is not None and not tied:
                hidx = idx.to(head.weight.device)
                head.weight[i] = head.weight[hidx].float().mean(0).to(head.weight.dtype)
    log.info("%d new tokens: rows initialised as the mean of their old sub-token rows", len(sub))
    return NewTokenRows(
        token_ids=ids,
        sub_tokens=sub,
        rows_before=rows_before,
        rows_after=int(emb.weight.shape[0]),
        tied=tied,
    )


def trains_token_rows(model: Any) -> bool:
    """Whether a peft model trains token rows (``trainable_token_indices``) rather than whole matrices."""
    cfg = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return bool(getattr(cfg, "trainable_token_indices", None))


def embedding_layers_to_save(model: Any) -> bool | str:
    """peft's ``save_embedding_layers`` for ``model``: False when it trains token rows (those rows are in
    the adapter, every other row is rebuilt from the base by :func:`grow_embeddings`), so the adapter stays
    a few rows instead of both grown matrices; else peft's own 'auto'."""
    return False if trains_token_rows(model) else "auto"
