"""Per-document attention for packed blocks: one plain causal SDPA call per document.

A packed block holds several documents, told apart by ``position_ids`` restarting at 0. transformers keeps
them apart with a block-diagonal boolean mask, which sends PyTorch's SDPA to a masked kernel (on the CPU a
packed step was ~10% slower than an unpacked one). :func:`packed_sdpa_attention`, registered with
transformers' ``AttentionInterface`` under :data:`PACKED_SDPA`, instead runs each document with the unmasked
causal kernel; the result is the same, forward and backward. Anything else (padding masks, sliding windows,
a KV cache, decoding) goes to transformers' own SDPA unchanged.

Finding the documents costs a pass over the mask (to prove it is exactly the block-causal mask of those
documents) and a device-to-host copy of where they start. transformers builds one mask per forward and hands
the same tensor to every layer, so the answer is worth keeping for the rest of the forward: callers that own
the forward (:func:`~lora_dapt.model.loss.causal_lm_loss_sum`) pass a fresh :class:`SpanCache` as an extra
forward argument (:func:`packed_attention_kwargs`), which transformers hands through to the attention
function of every layer (and to the layers that gradient checkpointing recomputes). A forward without one
(a user's own ``model(...)`` call) finds the documents again in each layer: correct, and on the CPU about as
fast (the check is a count and one comparison per document), but on a GPU each layer then waits for the copy.

Kernels (:func:`varlen_kernel`): on the CPU each document is one SDPA call (a Python loop, which costs
nothing next to the CPU's matmuls). On CUDA a loop over many short documents is launch-bound, so the whole
packed batch goes to one variable-length kernel fed with the documents' cumulative lengths
(:func:`cu_seqlens`): flash-attn's ``flash_attn_varlen_func`` when installed, else PyTorch's own
``torch.nn.attention.varlen.varlen_attn`` (both need fp16/bf16 and no attention dropout), else flex
attention with a document mask (any dtype; compiled on CUDA), else the loop. The choice is logged once per
loaded model (:func:`pick_attention`). Inside torch.compile'd layers (``train.compile``) the attention runs
eagerly: a graph per document length would recompile without end.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import logging
from typing import Any, Literal

import torch

log = logging.getLogger("lora_dapt")

PACKED_SDPA = "lora_dapt_sdpa"
"""Name under which :func:`packed_sdpa_attention` is registered with transformers' ``AttentionInterface``."""

SPAN_CACHE_KWARG = "lora_dapt_span_cache"
"""The forward keyword argument that carries a :class:`SpanCache` to :func:`packed_sdpa_attention`."""

Spans = list[list[tuple[int, int]]]
"""Per row of a batch, the ``[start, end)`` spans of its documents."""

Kernel = Literal["flash_attn", "torch_varlen", "flex", "loop"]
"""How :func:`packed_sdpa_attention` runs the documents of a packed batch (see the module docstring)."""

_HALF = (torch.float16, torch.bfloat16)


def document_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of the packed documents: a new one wherever the position does not go up by one
    (the rule transformers and :func:`_packed_spans` use; padding is a document of its own).

    Example: ``document_lengths(torch.tensor([[0, 1, 2, 0, 1]]))`` -> ``[[3, 2]]``.
    """
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    length = pos.shape[-1]
    new_doc = (pos[:, 1:] - pos[:, :-1] != 1).cpu()
    out = []
    for row in new_doc:
        starts = (torch.nonzero(row).flatten() + 1).tolist()
        out.append([e - s for s, e in itertools.pairwise([0, *starts, length])])
    return out


def cu_seqlens(spans: Spans, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """(cumulative lengths, longest document) of ``spans`` over the flattened ``[batch * seq]`` token axis:
    what varlen kernels take. int32, one entry more than there are documents.

    Example: spans ``[[(0, 3), (3, 5)], [(0, 5)]]`` -> ``(tensor([0, 3, 5, 10]), 5)``.
    """
    lengths = [e - s for row in spans for s, e in row]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return cu, max(lengths)


@functools.lru_cache(maxsize=8)
def _installed(module: str) -> bool:
    # what is installed does not change while a process runs; find_spec walks sys.path when it is absent
    return importlib.util.find_spec(module) is not None


def _torch_varlen() -> Any | None:
    """PyTorch's ``varlen_attn`` (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_kernel(device: torch.device | str, dtype: torch.dtype, *, dropout: float = 0.0) -> Kernel:
    """The kernel :func:`packed_sdpa_attention` uses for a packed batch on ``device`` in ``dtype``.

    'loop' (one causal SDPA call per document) on the CPU and wherever no varlen kernel applies; on CUDA
    'flash_attn' (flash-attn installed, fp16/bf16, no dropout), else 'torch_varlen' (PyTorch's own varlen
    flash kernel, fp16/bf16, no dropout), else 'flex' (flex attention with a document mask, no dropout).
    """
    if torch.device(device).type != "cuda" or dropout > 0:
        return "loop"
    if dtype in _HALF and _installed("flash_attn"):
        return "flash_attn"
    if dtype in _HALF and _torch_varlen() is not None:
        return "torch_varlen"
    if _installed("torch.nn.attention.flex_attention"):
        return "flex"
    return "loop"


def _packed_spans(
    mask: torch.Tensor | None, position_ids: torch.Tensor, batch: int, length: int
) -> Spans | None:
    """Per row, the ``[start, end)`` spans of the packed documents (a new document wherever the position does
    not go up by one), or None when there is nothing to split or ``mask`` is not exactly the block-causal
    mask those spans imply (a padding mask, a sliding window, ...).

    ``mask`` None means transformers found plain causal attention enough: it skips packing detection when the
    model runs with a KV cache (``use_cache=True``), so then the documents are split here, as
    flash-attention's varlen path does. Example: position_ids ``[[0, 1, 2, 0, 1]]`` -> ``[[(0, 3), (3, 5)]]``.
    """
    with torch.no_grad():
        pos = position_ids.expand(batch, -1)
        new_doc = pos[:, 1:] - pos[:, :-1] != 1  # [batch, length - 1]
        if mask is None:
            if not bool(new_doc.any()):
                return None
        elif not (
            mask.dtype == torch.bool
            and mask.dim() == 4
            and mask.shape[0] in (1, batch)
            and mask.shape[1] == 1
            and mask.shape[-2:] == (length,) * 2
        ):
            return None
        spans = []
        for starts in (torch.nonzero(row).flatten() + 1 for row in new_doc.cpu()):
            spans.append(list(itertools.pairwise([0, *starts.tolist(), length])))
        if mask is not None and not _is_block_causal(mask[:, 0].expand(batch, length, length), spans):
            return None
    return spans


def _is_block_causal(mask: torch.Tensor, spans: Spans) -> bool:
    """Whether ``mask`` [batch, length, length] is exactly causal within each span and False elsewhere.

    Exact without building the block-causal mask: every diagonal block equals a lower triangle, and the
    mask holds no more True entries than those triangles do, so none lies outside them.
    """
    inside = sum((e - s) * (e - s + 1) // 2 for row in spans for s, e in row)
    if int(torch.count_nonzero(mask)) != inside:
        return False
    longest = max(e - s for row in spans for s, e in row)
    tril = torch.ones(longest, longest, dtype=torch.bool, device=mask.device).tril()
    return all(
        torch.equal(mask[b, s:e, s:e], tril[: e - s, : e - s]) for b, row in enumerate(spans) for s, e in row
    )


class SpanCache:
    """The document spans of one forward pass, by (mask, position_ids) tensor: see the module docstring.

    Holds its tensors only as long as the forward (and a gradient-checkpointing recompute) holds the cache;
    a model whose layers use different masks (sliding and full attention) gets one entry per mask.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor | None, torch.Tensor, Spans | None]] = []
        self._layouts: list[tuple[Spans, str, Any]] = []

    def spans(
        self, mask: torch.Tensor | None, position_ids: torch.Tensor, batch: int, length: int
    ) -> Spans | None:
        """:func:`_packed_spans` of these tensors, computed on the first call only."""
        for known_mask, known_pos, spans in self._entries:
            if known_mask is mask and known_pos is position_ids:
                return spans
        spans = _packed_spans(mask, position_ids, batch, length)
        self._entries.append((mask, position_ids, spans))
        return spans

    def layout(self, spans: Spans, kernel: str, device: torch.device, length: int) -> Any:
        """:func:`_kernel_layout` of ``spans`` (cumulative lengths, a flex block mask), built once a forward."""
        for known, known_kernel, layout in self._layouts:
            if known is spans and known_kernel == kernel:
                return layout
        layout = _kernel_layout(spans, kernel, device, length)
        self._layouts.append((spans, kernel, layout))
        return layout


def packed_attention_kwargs(model: Any) -> dict[str, Any]:
    """Extra forward arguments for one forward of ``model``: a fresh :class:`SpanCache` when ``model`` runs
    :func:`packed_sdpa_attention` and its forward takes extra keyword arguments, else nothing.

    Example::

        hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False, **packed_attention_kwargs(decoder))
    """
    inner = getattr(model, "module", model)  # a DistributedDataParallel wrapper has no config
    config = getattr(model, "config", None) or getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) != PACKED_SDPA:
        return {}
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a forward inspect cannot read
        return {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {}
    return {SPAN_CACHE_KWARG: SpanCache()}


@torch.compiler.disable  # runs eagerly inside compiled layers (train.compile): a shape per document
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

    Each document of each row is attended with ``is_causal=True`` and no mask, so the work is the sum of the
    squared document lengths instead of the squared block length, and the result is the same as the masked
    path (tested, forward and backward). Anything that is not exactly a block-causal packing mask (padding
    masks, sliding windows, bidirectional image spans, a KV cache, decoding) goes to transformers'
    ``sdpa_attention_forward`` unchanged. ``kwargs`` may carry a :class:`SpanCache` (:data:`SPAN_CACHE_KWARG`).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache: SpanCache | None = kwargs.pop(SPAN_CACHE_KWARG, None)
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
        batch = query.shape[0]
        if cache is not None:
            spans = cache.spans(attention_mask, position_ids, batch, q_len)
        else:
            spans = _packed_spans(attention_mask, position_ids, batch, q_len)
        if spans is not None:
            kernel = varlen_kernel(query.device, query.dtype, dropout=dropout)
            layout = None
            if kernel != "loop":
                layout = (
                    cache.layout(spans, kernel, query.device, q_len)
                    if cache is not None
                    else _kernel_layout(spans, kernel, query.device, q_len)
                )
            return packed_attention(
                query, key, value, spans, kernel=kernel, scaling=scaling, dropout=dropout, layout=layout
            ), None
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


def _kernel_layout(spans: Spans, kernel: str, device: torch.device, length: int) -> Any:
    """What ``kernel`` needs besides q/k/v: (cu_seqlens, longest document) for the varlen kernels, a flex
    ``BlockMask`` (causal within each document) for 'flex', None for the loop."""
    if kernel in ("flash_attn", "torch_varlen"):
        return cu_seqlens(spans, device)
    if kernel != "flex":
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.tensor(
        [[i for i, (s, e) in enumerate(row) for _ in range(e - s)] for row in spans], device=device
    )  # [batch, seq]: the document index of every position

    def same_document_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, len(spans), None, length, length, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Any:
    # flex attention is only fast compiled; compiling once per process is what PyTorch recommends
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: Spans,
    *,
    kernel: Kernel = "loop",
    scaling: float | None = None,
    dropout: float = 0.0,
    layout: Any = None,
) -> torch.Tensor:
    """Causal attention within each document of a packed batch, with ``kernel`` (:func:`varlen_kernel`).

    ``query`` [batch, heads, seq, head_dim], ``key``/``value`` [batch, kv_heads, seq, head_dim] (grouped-query
    heads are shared, never copied by the varlen kernels); returns [batch, seq, heads, head_dim], what
    transformers' attention functions return. ``spans`` tile each row (:func:`_packed_spans`); ``layout`` is
    :func:`_kernel_layout` when the caller keeps it for the forward (built here otherwise).
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if kernel == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = layout if layout is not None else _kernel_layout(spans, kernel, query.device, length)
        flex = _compiled_flex() if query.device.type == "cuda" else flex_attention
        out = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=kv_heads != heads)
        return out.transpose(1, 2)
    if kernel in ("flash_attn", "torch_varlen"):
        cu, longest = layout if layout is not None else _kernel_layout(spans, kernel, query.device, length)
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], head_dim) for t in (query, key, value))
        if kernel == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            out = flash_attn_varlen_func(
                q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=True
            )
        else:
            varlen_attn = _torch_varlen()
            out = varlen_attn(
                q,
                k,
                v,
                cu,
                cu,
                longest,
                longest,
                scale=scaling,
                window_size=(-1, 0),
                enable_gqa=kv_heads != heads,
            )
        return out.reshape(batch, length, heads, head_dim)
    # the loop. Documents are cut out of token-major views with one split per tensor: its backward is a single
    # concatenation, where slicing each document out would zero-fill a full-size gradient per document.
    lengths = [e - s for row in spans for s, e in row]
    parts = [
        torch.split(t.transpose(1, 2).reshape(-1, t.shape[1], head_dim), lengths) for t in (query, key, value)
    ]
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=kv_heads != heads,
        )
        .squeeze(0)
        .transpose(0, 1)
        for q, k, v in zip(*parts, strict=True)
    ]  # each [doc_len, heads, head_dim]
    joined = out[0] if len(out) == 1 else torch.cat(out, dim=0)  # [batch * seq, heads, head_dim]
    return joined.reshape(batch, length, heads, head_dim)


def register_packed_sdpa() -> str:
    """Register :func:`packed_sdpa_attention` (and transformers' SDPA mask builder) as ``PACKED_SDPA``.

    Registering is transformers' public way to add a kernel; doing it again replaces the entry with itself.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def use_packed_sdpa(model: Any) -> bool:
    """Switch a model that runs transformers' ``sdpa`` to :func:`packed_sdpa_attention`; True when switched.

    Models on other kernels (flash-attention varlen, eager, a user's choice) are left alone. The switch is
    not saved: ``save_pretrained`` writes no attention implementation, so a saved model loads anywhere.
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
    position_ids when no attention_mask is passed (:func:`~lora_dapt.model.load.load_base_model` then
    switches it to :func:`packed_sdpa_attention`, which runs each packed document with the unmasked causal
    kernel, or a varlen kernel on CUDA: :func:`varlen_kernel`; the choice is logged here, once per load).
    ``model_config`` is not consulted yet; it is where a per-architecture choice would look.
    """
    if requested:
        return requested
    if device.type == "cuda" and _installed("flash_attn"):
        log.info("attention: flash_attention_2 (flash-attn's varlen kernel, documents split by position_ids)")
        return "flash_attention_2"
    # the one place a load passes through: say once per model which kernel its packed documents will use
    fp32 = varlen_kernel(device, torch.float32)
    log.info(
        "attention: lora_dapt packed SDPA on %s; packed documents run with the %r kernel in bf16/fp16 (%r in fp32)",
        device.type,
        varlen_kernel(device, torch.bfloat16),
        fp32,
    )
    return "sdpa"
