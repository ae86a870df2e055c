"""Packed-document attention kernels: the loop, flex attention (forward on the CPU), the varlen inputs and the
kernel choice. The whole-model comparisons with transformers' masked SDPA are in test_model.py."""

from __future__ import annotations

import pytest
import torch

from lora_dapt.model import attention
from lora_dapt.model.attention import (
    _kernel_layout,
    _packed_spans,
    cu_seqlens,
    document_lengths,
    packed_attention,
    varlen_kernel,
)

LENGTHS = [[9, 1, 17, 13], [40]]  # a 1-token document; a row holding one document


def _positions(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def _qkv(batch: int = 2, heads: int = 4, kv_heads: int = 2, length: int = 40, head_dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, head_dim, generator=g, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g, requires_grad=True)
    return q, k, v


def _masked_reference(q, k, v, lengths, scaling=None):
    """transformers' layout: one SDPA call with the block-causal boolean mask, [batch, seq, heads, dim]."""
    doc = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
    t = torch.arange(q.shape[2])
    mask = (doc[:, :, None] == doc[:, None, :]) & (t[:, None] >= t[None, :])  # [batch, seq, seq]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2)


def test_document_lengths_and_cu_seqlens():
    pos = _positions(LENGTHS)
    assert document_lengths(pos) == LENGTHS
    spans = _packed_spans(None, pos, 2, 40)
    cu, longest = cu_seqlens(spans)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 9, 10, 27, 40, 80]  # over the flattened [batch * seq] token axis
    assert longest == 40
    assert document_lengths(torch.tensor([0, 1, 2, 0, 1])) == [[3, 2]]  # one row without a batch axis


def test_loop_equals_masked_sdpa_forward_and_backward():
    q, k, v = _qkv()
    spans = _packed_spans(None, _positions(LENGTHS), 2, 40)
    ours = packed_attention(q, k, v, spans, kernel="loop", scaling=0.3)
    ours.square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = _masked_reference(q, k, v, LENGTHS, scaling=0.3)
    ref.square().sum().backward()
    assert ours.shape == (2, 40, 4, 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for g, t in zip(got, (q, k, v), strict=True):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_on_cpu_equals_masked_sdpa_and_the_loop():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = (t.detach() for t in _qkv())
    spans = _packed_spans(None, _positions(LENGTHS), 2, 40)
    layout = _kernel_layout(spans, "flex", torch.device("cpu"), 40)
    with torch.no_grad():  # flex attention has no CPU backward (torch 2.13)
        flex = packed_attention(q, k, v, spans, kernel="flex", layout=layout)
        loop = packed_attention(q, k, v, spans, kernel="loop")
        ref = _masked_reference(q, k, v, LENGTHS)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex, loop, atol=1e-5, rtol=1e-5)
    # a mask that let documents see each other would change the output: the block mask really separates them
    with torch.no_grad():
        one_doc = _masked_reference(q, k, v, [[40], [40]])
    assert (flex[0, 9:] - one_doc[0, 9:]).abs().max() > 1e-2


def test_kernel_choice(monkeypatch):
    assert varlen_kernel("cpu", torch.bfloat16) == "loop"  # the CPU keeps the loop
    installed = {"flash_attn": True, "torch.nn.attention.flex_attention": True}
    monkeypatch.setattr(attention, "_installed", lambda name: installed.get(name, False))
    assert varlen_kernel("cuda", torch.bfloat16) == "flash_attn"
    assert varlen_kernel("cuda", torch.bfloat16, dropout=0.1) == "loop"  # no varlen kernel takes dropout here
    assert varlen_kernel("cuda", torch.float32) == "flex"  # the flash kernels need fp16/bf16
    installed["flash_attn"] = False
    assert varlen_kernel("cuda", torch.float16) == "torch_varlen"  # torch 2.13 ships varlen_attn
    monkeypatch.setattr(attention, "_torch_varlen", lambda: None)
    assert varlen_kernel("cuda", torch.float16) == "flex"
    installed["torch.nn.attention.flex_attention"] = False
    assert varlen_kernel("cuda", torch.float16) == "loop"


def test_span_cache_builds_each_layout_once(monkeypatch):
    built = []
    real = attention._kernel_layout
    monkeypatch.setattr(attention, "_kernel_layout", lambda *a: built.append(a[1]) or real(*a))
    cache = attention.SpanCache()
    pos = _positions(LENGTHS)
    spans = cache.spans(None, pos, 2, 40)
    first = cache.layout(spans, "torch_varlen", torch.device("cpu"), 40)
    assert cache.layout(spans, "torch_varlen", torch.device("cpu"), 40) is first  # the next layer reuses it
    assert built == ["torch_varlen"]
    assert first[0].tolist() == [0, 9, 10, 27, 40, 80] and first[1] == 40


def test_model_on_cpu_runs_the_loop_and_matches_masked_sdpa(tiny_model_dir, monkeypatch):
    from lora_dapt.model.load import load_base_model

    kernels = []
    real = attention.packed_attention
    monkeypatch.setattr(
        attention, "packed_attention", lambda *a, **kw: kernels.append(kw["kernel"]) or real(*a, **kw)
    )
    ours, _ = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    theirs, _ = load_base_model(
        tiny_model_dir, quantization=None, compute_dtype="float32", attn_implementation="sdpa"
    )
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    pos = _positions(LENGTHS)
    with torch.no_grad():
        a = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = theirs(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert kernels == ["loop"] * ours.config.num_hidden_layers
