"""train.compile: when 'auto' compiles, and that compiled training computes what eager training does."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from lora_dapt import TrainConfig
from lora_dapt.errors import ConfigError
from lora_dapt.model.loss import causal_lm_loss_sum
from lora_dapt.train import compile as compile_mod
from lora_dapt.train.compile import (
    EAGER_MFU,
    MIN_TRAIN_S,
    choose_compile,
    decoder_layers,
    estimate_train_seconds,
)
from lora_dapt.train.pretrain import continued_pretrain

from .conftest import make_text
from .test_train import _eval_corpus, blocks, qlora

PEAK = 1e12  # FLOP/s
FLOPS = 1e9  # per token


def tokens_for(seconds: float) -> int:
    """Training tokens that the estimate puts at ``seconds`` of eager training."""
    return int(seconds * PEAK * EAGER_MFU / FLOPS)


def test_estimate_is_tokens_times_flops_over_the_assumed_utilisation():
    assert estimate_train_seconds(3_000, 2e9, 1e12) == pytest.approx(3_000 * 2e9 / (1e12 * EAGER_MFU))
    assert estimate_train_seconds(3_000, 2e9, None) is None


def test_auto_compiles_only_runs_long_enough_to_repay_it(tiny_model_dir, monkeypatch):
    model, _ = qlora(tiny_model_dir)
    monkeypatch.setattr(compile_mod, "compiler_problem", lambda: None)
    short = choose_compile(
        "auto", model, train_tokens=tokens_for(MIN_TRAIN_S / 2), flops_per_token=FLOPS, peak_flops_per_s=PEAK
    )
    assert not short.enabled
    assert "about 2.5 min of training estimated, under the 5 min" in short.reason
    long = choose_compile(
        "auto", model, train_tokens=tokens_for(MIN_TRAIN_S * 4), flops_per_token=FLOPS, peak_flops_per_s=PEAK
    )
    assert long.enabled and "torch.compile on (train.compile=auto): about 20 min" in long.reason
    assert f"the {len(decoder_layers(model))} decoder layers" in long.reason
    unknown = choose_compile("auto", model, train_tokens=10**12, flops_per_token=FLOPS, peak_flops_per_s=None)
    assert not unknown.enabled and "no matmul peak" in unknown.reason
    # a compiler that fails on the probe turns 'auto' off and says why; 'true' refuses to start
    monkeypatch.setattr(compile_mod, "compiler_problem", lambda: "torch.compile failed on a probe (boom)")
    broken = choose_compile("auto", model, train_tokens=10**12, flops_per_token=FLOPS, peak_flops_per_s=PEAK)
    assert not broken.enabled and broken.reason.endswith("failed on a probe (boom)")
    with pytest.raises(ConfigError, match="train.compile=true: torch.compile failed on a probe"):
        choose_compile(True, model, train_tokens=1, flops_per_token=FLOPS, peak_flops_per_s=PEAK)


def test_explicit_settings_and_devices(tiny_model_dir):
    model, _ = qlora(tiny_model_dir)
    off = choose_compile(False, model, train_tokens=10**12, flops_per_token=FLOPS, peak_flops_per_s=PEAK)
    assert off == compile_mod.CompileChoice(False, "torch.compile off (train.compile=false)")
    with pytest.raises(ValueError, match="true, false or 'auto', not 'yes'"):
        choose_compile("yes", model, train_tokens=1, flops_per_token=FLOPS, peak_flops_per_s=PEAK)
    # 'auto' off the CPU stays eager (not measured there), however long the run
    meta = torch.nn.Module()
    meta.register_parameter("w", torch.nn.Parameter(torch.empty(2, device="meta")))
    gpu_like = choose_compile("auto", meta, train_tokens=10**15, flops_per_token=FLOPS, peak_flops_per_s=PEAK)
    assert not gpu_like.enabled and "measured on the CPU only; train.compile=true tries it on meta" in (
        gpu_like.reason
    )
    with pytest.raises(ConfigError, match="no decoder `layers` list"):  # nothing to compile
        choose_compile(True, meta, train_tokens=1, flops_per_token=FLOPS, peak_flops_per_s=PEAK)


def test_compiled_head_chunks_equal_the_eager_loss_and_gradients(tiny_model_dir, monkeypatch):
    import lora_dapt.model.loss as loss_mod

    model, tok = qlora(tiny_model_dir, init_lora_weights=False)
    ds = blocks(tok, [make_text(30, s) for s in range(4)], seq_len=48)
    batch = {k: torch.tensor(ds[:2][k]) for k in ("input_ids", "labels", "position_ids")}
    vocab = model.get_base_model().config.vocab_size
    monkeypatch.setattr(loss_mod, "CPU_HEAD_CHUNK_BYTES", 32 * 4 * vocab)  # chunks of 32 and a remainder

    def loss_and_grads(compiled: bool):
        model.zero_grad()
        loss_sum, n = causal_lm_loss_sum(
            model, batch["input_ids"], batch["labels"], batch["position_ids"], compiled_head=compiled
        )
        (loss_sum / n).backward()
        return n, loss_sum.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    n, eager_loss, eager = loss_and_grads(False)
    assert n > 64 and n % 32  # several full chunks and a remainder
    counters.clear()
    m, compiled_loss, compiled = loss_and_grads(True)
    assert m == n and compiled_loss == pytest.approx(eager_loss, rel=1e-6)
    assert compiled.keys() == eager.keys() and len(eager) > 4
    for k in eager:
        assert eager[k].abs().max() > 0, k
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-6, rtol=1e-5)
    # another remainder: the full chunks' graph serves again; the remainder runs eagerly, not recompiled
    batch = {k: torch.tensor(ds[:1][k]) for k in ("input_ids", "labels", "position_ids")}
    other, _, _ = loss_and_grads(True)
    assert other % 32 != n % 32
    assert counters["stats"]["unique_graphs"] <= 1  # 0 when an earlier test compiled this shape already


def test_compiled_run_trains_as_the_eager_run(tiny_model_dir, tmp_path, caplog):
    """train.compile=true, checkpointing on, evaluation during training: the same losses, evaluations and
    adapter as the eager run; the layers are eager again afterwards."""
    general = [make_text(30, seed=99)]
    runs = {}
    for setting in (False, True):
        model, tok = qlora(tiny_model_dir, gradient_checkpointing=True)
        cfg = TrainConfig(
            output_dir=str(tmp_path / f"run-{setting}"),
            max_steps=4,
            eval_every=2,
            learning_rate=1e-2,
            batch_size=2,
            compile=setting,
        )
        counters.clear()
        with caplog.at_level(logging.INFO, logger="lora_dapt"):
            result = continued_pretrain(model, tok, _eval_corpus(tok), cfg, general_texts=general)
        # the layers' two graphs (before and after the eager attention) and the head chunk's (fewer when an
        # earlier test compiled it); evaluations during training run eagerly: compiled too, they make it 20
        graphs = counters["stats"]["unique_graphs"]
        assert 0 < graphs <= 4 if setting else graphs == 0
        rows = [
            json.loads(x) for x in (tmp_path / f"run-{setting}" / "metrics.jsonl").read_text().splitlines()
        ]
        runs[setting] = (
            result,
            rows,
            {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
        )
        assert result.compiled is setting
        assert all("forward" not in vars(layer) for layer in decoder_layers(model))
    assert "torch.compile on (train.compile=true): 2 decoder layers and the loss" in caplog.text
    assert "torch.compile off (train.compile=false)" in caplog.text
    (_, eager_rows, eager_w), (_, comp_rows, comp_w) = runs[False], runs[True]
    assert json.loads((tmp_path / "run-True" / "summary.json").read_text())["compiled"] is True
    losses = [[r["loss"] for r in rows if r["type"] == "train"] for rows in (eager_rows, comp_rows)]
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    evals = [
        [(r["phase"], r["step"], r["loss"]) for r in rows if r["type"] == "eval"]
        for rows in (eager_rows, comp_rows)
    ]
    assert [e[:2] for e in evals[1]] == [e[:2] for e in evals[0]] and ("during", 2) in [
        e[:2] for e in evals[1]
    ]
    assert [e[2] for e in evals[1]] == pytest.approx([e[2] for e in evals[0]], rel=1e-4)
    domain = [r["loss"] for r in comp_rows if r["type"] == "eval" and r["split"] == "domain"]
    assert domain[-1] < domain[0]  # it learned
    for k in eager_w:
        torch.testing.assert_close(comp_w[k], eager_w[k], atol=1e-4, rtol=1e-3)
