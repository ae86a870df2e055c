"""model.attention (split from model)."""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any

import torch

log = logging.getLogger("lora_dapt")

PACKED_SDPA = "lora_dapt_sdpa"
"""Name under which :func:`packed_sdpa_attention` is registered with transformers' ``AttentionInterface``."""


_SPAN_CACHE: list[tuple[Any, Any, list[list[tuple[int, int]]] | None]] = []


def _packed_spans(
    mask: torch.Tensor | None, position_ids: torch.Tensor, batch: int, length: int
) -> list[list[tuple[int, int]]] | None:
    """Per row, the ``[start, end)`` spans of the packed documents (a new document wherever the position does
    not go up by one), or None when there is nothing to split or ``mask`` is not exactly the block-causal
    mask those spans imply (a padding mask, a sliding window, ...).

    ``mask`` None means transformers found plain causal attention enough: it skips packing detection when the
    model runs with a KV cache (``use_cache=True``), so then the documents are split here, as
    flash-attention's varlen path does. transformers builds one mask per forward and hands the same tensor
    to every layer (and to the recomputed layers of gradient checkpointing), so the answer is cached per
    (mask, position_ids) pair of live tensors.
    """
    for mask_ref, pos_ref, spans in _SPAN_CACHE:
        if (mask_ref() if mask_ref is not None else None) is mask and pos_ref() is position_ids:
            return spans
    spans = None
    with torch.no_grad():
        pos = position_ids.expand(batch, -1)
        new_doc = pos[:, 1:] - pos[:, :-1] != 1
        if mask is None:
            ok = bool(new_doc.any())
        elif (
            mask.dtype == torch.bool
            and mask.dim() == 4
            and mask.shape[1] == 1
            and mask.shape[-2:] == (length,) * 2
        ):
            seg = torch.cat([torch.zeros_like(pos[:, :1]), new_doc.long().cumsum(-1)], dim=1)
            causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
            block_causal = (seg[:, None, :, None] == seg[:, None, None, :]) & causal
            ok = torch.equal(mask.expand(batch, 1, length, length), block_causal)
        else:
            ok = False
        if ok:
            spans = []
            for starts in (torch.nonzero(row).flatten() + 1 for row in new_doc.cpu()):
                edges = [0, *starts.tolist(), length]
                spans.append(list(itertools.pairwise(edges)))
    mask_ref = weakref.ref(mask) if mask is not None else None
    _SPAN_CACHE.insert(0, (mask_ref, weakref.ref(position_ids), spans))
    del _SPAN_CACHE[4:]
    return spans


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA that runs a packed block one document at a time, each with the plain causal kernel.

    transformers' own SDPA path isolates packed documents with a block-diagonal boolean mask, which sends
    PyTorch to a masked kernel (and repeats grouped key/value heads); on the CPU that made a packed step
    ~10% slower than an unpacked one. Here each document of each row is attended with ``is_causal=True``
    and no mask, so the work is the sum of the squared document lengths instead of the squared block
    length, and the result is the same (tested against the masked path, forward and backward).

    Anything that is not exactly a block-causal packing mask (padding masks, sliding windows, bidirectional
    image spans, a KV cache, decoding) goes to transformers' ``sdpa_attention_forward`` unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (
        position_ids is not None
        and position_ids.shape[-1] == q_len
        and causal
        and q_len > 1
        and key.shape[2] == q_len
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    ):
        spans = _packed_spans(attention_mask, position_ids, query.shape[0], q_len)
        if spans is not None:
            # Documents are cut out of token-major views with one split per tensor: its backward is a single
            # concatenation, where slicing each document out would zero-fill a full-size gradient per document.
            lengths = [e - s for row in spans for s, e in row]
            parts = [
                torch.split(t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]), lengths)
                for t in (query, key, value)
            ]
            out = [
                sdpa_attention_forward(
                    module,
                    q.transpose(0, 1).unsqueeze(0),
                    k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0),
                    None,
                    dropout=dropout,
                    scaling=scaling,
                    is_causal=True,
                )[0]
                for q, k, v in zip(*parts, strict=True)
            ]
            joined = out[0] if len(out) == 1 else torch.cat(out, dim=1)  # [1, batch * seq, heads, head_dim]
            return joined.reshape(query.shape[0], q_len, *joined.shape[2:]), None
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def register_packed_sdpa() -> str:
    """Register :func:`packed_sdpa_attention` (and transformers' SDPA mask builder) as ``PACKED_SDPA``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def use_packed_sdpa(model: Any) -> bool:
    """Switch a model that runs transformers' ``sdpa`` to :func:`packed_sdpa_attention`; True when switched.

    Models on other kernels (flash-attention varlen, eager, a user's choice) are left alone.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(
        model, "set_attn_implementation"
    ):
        return False
    register_packed_sdpa()
    try:
        model.set_attn_implementation(PACKED_SDPA)
    except (ValueError, ImportError) as e:  # pragma: no cover - a model class that cannot switch
        log.debug("keeping sdpa attention: %s", e)
        return False
    return model.config._attn_implementation == PACKED_SDPA


def pick_attention(model_config: Any, requested: str | None, device: torch.device) -> str:
    """An attention implementation that keeps packed documents apart (driven by position_ids).

    flash_attention_2 (varlen) on CUDA when installed; otherwise sdpa, whose mask transformers builds from
    position_ids when no attention_mask is passed (:func:`load_base_model` then switches it to
    :func:`packed_sdpa_attention`, which runs each packed document with the unmasked causal kernel).
    """
    if requested:
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"
