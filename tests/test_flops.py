"""Model FLOPs per token, the cached matmul peak and MFU (lora_dapt.train.flops)."""

from __future__ import annotations

import json

import pytest
import torch

from lora_dapt.train import flops as fl
from lora_dapt.train.flops import BlockSample, PeakFlops, TokenFlops

TINY = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
# by hand: q 64x64, k and v 64x32 (2 kv heads of 16), o 64x64, gate/up/down 64x128 -> 36,864 a layer
LAYER_LINEARS = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
HEAD = 320 * 64  # the output head is a matmul; the embedding lookup (also 320x64) is not


def test_tiny_llama_flops_by_hand():
    assert LAYER_LINEARS == 73_728
    n_lora = 1000
    # one block of 8 positions, every one trained, one document of 8 tokens: 36 causal pairs
    sample = BlockSample(positions=8, trained=8, attention_pairs=36)
    got = fl.flops_per_token(TINY, n_lora, sample, gradient_checkpointing=False)
    n = LAYER_LINEARS + HEAD
    assert got.forward == 2 * n
    assert got.backward == 2 * n
    assert got.lora == 6 * n_lora
    # per pair: 4 x head_dim 16 x 4 query heads x 2 layers forward, three times that with the backward
    assert got.attention == pytest.approx(3 * 4 * 16 * 4 * 2 * 36 / 8)
    assert got.recompute == 0
    assert got.total == pytest.approx(4 * n + 6 * n_lora + 12 * 16 * 4 * 2 * 36 / 8)


def test_untrained_positions_cost_decoder_flops_but_not_head_flops():
    # 8 positions, 6 trained (a document's first token and a pad are not): the decoder runs 8, the head 6
    got = fl.flops_per_token(TINY, 0, BlockSample(8, 6, 36), gradient_checkpointing=False)
    assert got.forward == pytest.approx(2 * LAYER_LINEARS * 8 / 6 + 2 * HEAD)


def test_recompute_adds_one_decoder_forward():
    sample = BlockSample(positions=8, trained=8, attention_pairs=36)
    plain = fl.flops_per_token(TINY, 500, sample, gradient_checkpointing=False)
    ckpt = fl.flops_per_token(TINY, 500, sample, gradient_checkpointing=True)
    attn_forward = 4 * 16 * 4 * 2 * 36 / 8
    assert ckpt.recompute == pytest.approx(
        2 * LAYER_LINEARS + 2 * 500 + attn_forward
    )  # the head is not recomputed
    assert ckpt.total - plain.total == pytest.approx(ckpt.recompute)
    trained_head = fl.flops_per_token(TINY, 500, sample, gradient_checkpointing=False, trained_head=True)
    assert trained_head.lora - plain.lora == 2 * HEAD  # the head's weight gradient


def test_attention_term_of_a_packed_block():
    from datasets import Dataset

    # two blocks of 10: documents [4, 6] and [10]; labels -100 at each document's first token
    rows = {
        "input_ids": [[5] * 10, [6] * 10],
        "position_ids": [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], list(range(10))],
        "labels": [[-100, 5, 5, 5, -100, 5, 5, 5, 5, 5], [-100] + [6] * 9],
    }
    sample = fl.sample_blocks(Dataset.from_dict(rows))
    assert fl.attention_pairs([4, 6]) == 10 + 21
    assert sample == BlockSample(positions=20, trained=8 + 9, attention_pairs=10 + 21 + 55)
    # not seq**2 per block: the one-document block alone would be 2 x 55 pairs
    assert sample.attention_pairs < 2 * fl.attention_pairs([10])


def test_model_flops_per_token_reads_the_lora_model(tiny_model_dir):
    from datasets import Dataset

    from lora_dapt.config import AdapterConfig
    from lora_dapt.model.load import load_base_model
    from lora_dapt.model.lora import apply_lora
    from lora_dapt.planning.shapes import model_shape

    model, _ = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    model = apply_lora(model, AdapterConfig(r=4, alpha=8, gradient_checkpointing=True))
    shape = model_shape(model)
    # r x (in + out) for every targeted linear layer
    n_lora = sum(4 * (i + o) for _, i, o in shape.linears)
    ds = Dataset.from_dict({"input_ids": [[5] * 8], "position_ids": [list(range(8))], "labels": [[5] * 8]})
    got = fl.model_flops_per_token(model, ds)
    want = fl.flops_per_token(shape, n_lora, BlockSample(8, 7, 36), gradient_checkpointing=True)
    assert got == want and got.recompute > 0


def test_peak_cache_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "peak_flops.json"
    measured = []
    monkeypatch.setattr(fl, "measure_matmul_peak", lambda *a, **kw: measured.append(a) or 3.5e11)
    first = fl.matmul_peak("cpu", torch.float32, cache_path=path)
    assert first.source == "measured" and first.flops_per_s == 3.5e11
    key = fl.peak_key("cpu", torch.float32)
    assert first.key == key and "float32" in key and f"{torch.get_num_threads()} threads" in key
    assert json.loads(path.read_text()) == {key: 3.5e11}
    again = fl.matmul_peak("cpu", torch.float32, cache_path=path)
    assert (again.source, again.flops_per_s) == ("cached", 3.5e11) and len(measured) == 1
    assert fl.matmul_peak("cpu", torch.bfloat16, measure=False, cache_path=path) is None  # another dtype
    fl.matmul_peak("cpu", torch.bfloat16, cache_path=path)
    assert len(json.loads(path.read_text())) == 2  # both dtypes kept
    refreshed = fl.matmul_peak("cpu", torch.float32, refresh=True, cache_path=path)
    assert refreshed.source == "measured" and len(measured) == 3
    # a slower measurement (a busy machine) keeps the best rate seen
    monkeypatch.setattr(fl, "measure_matmul_peak", lambda *a, **kw: 1e11)
    assert fl.matmul_peak("cpu", torch.float32, refresh=True, cache_path=path).flops_per_s == 3.5e11
    assert json.loads(path.read_text())[key] == 3.5e11


def test_peak_not_measured_over_budget(tmp_path, monkeypatch):
    # a probe at 1 GFLOP/s predicts about 34 s for the 2048 matmuls: over a 2 s budget
    monkeypatch.setattr(fl, "measure_matmul_peak", lambda *a, size=2048, **kw: 1e9)
    assert fl.matmul_peak("cpu", torch.float32, measure=2.0, cache_path=tmp_path / "p.json") is None
    assert not (tmp_path / "p.json").exists()


def test_measured_peak_is_a_real_rate():
    rate = fl.measure_matmul_peak("cpu", torch.float32, size=256, seconds=0.05)
    assert 1e8 < rate < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s on any CPU


def test_mfu_arithmetic():
    flops = TokenFlops(forward=2e8, backward=2e8, lora=1e7, attention=3e7, recompute=0.0)
    assert flops.total == 4.4e8
    peak = PeakFlops(flops_per_s=2.2e12, dtype="bfloat16", source="cached", key="k")
    assert fl.mfu(500.0, flops, peak) == pytest.approx(0.1)
    out = fl.utilisation(flops, 500.0, peak)
    assert out["achieved_tflops"] == pytest.approx(0.22)
    assert out["peak_tflops"] == pytest.approx(2.2) and out["mfu"] == pytest.approx(0.1)
    assert out["peak_source"] == "cached: k" and out["model_flops_per_token"] == 4.4e8
    none = fl.utilisation(flops, 500.0, None)
    assert (
        none["mfu"] is None and none["peak_tflops"] is None and none["achieved_tflops"] == pytest.approx(0.22)
    )


def test_run_summary_reports_mfu_against_the_cached_peak(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch
):
    from datasets import Dataset

    from lora_dapt import AdapterConfig, EvalConfig, TrainConfig
    from lora_dapt.data.packing import pack_documents
    from lora_dapt.model.load import load_base_model
    from lora_dapt.model.lora import apply_lora
    from lora_dapt.rundir import RunDir
    from lora_dapt.train.pretrain import continued_pretrain

    from .conftest import make_text

    monkeypatch.setenv("LORA_DAPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fl, "measure_matmul_peak", lambda *a, **kw: pytest.fail("the cached peak is used"))
    model, tok = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    key = fl.peak_key("cpu", torch.float32)
    fl.peak_cache_path().parent.mkdir(parents=True)
    fl.peak_cache_path().write_text(json.dumps({key: 1e11}))
    model = apply_lora(model, AdapterConfig(r=4, alpha=8, dropout=0.0, gradient_checkpointing=False))
    docs = [[tok.bos_token_id, *tok(make_text(30, s), add_special_tokens=False).input_ids] for s in range(8)]
    ds = Dataset.from_list(pack_documents(docs, 32, tok.pad_token_id))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, save_every=0)
    res = continued_pretrain(model, tok, ds, cfg, eval_config=EvalConfig(enabled=False))
    want = fl.model_flops_per_token(model, ds).total
    assert res.model_flops_per_token == pytest.approx(want)
    assert res.achieved_tflops == pytest.approx(res.tokens_per_s * want / 1e12)
    assert res.peak_tflops == pytest.approx(0.1) and res.peak_source == f"cached: {key}"
    assert res.mfu == pytest.approx(res.tokens_per_s * want / 1e11)
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary["mfu"] == pytest.approx(res.mfu) and summary["flops_terms"]["recompute"] == 0
