"""Honest gain and forgetting: the original 16-bit model (and the adapter on it) scored beside the 4-bit run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from lora_dapt import AdapterConfig, EvalConfig, TrainConfig
from lora_dapt.data.packing import pack_documents
from lora_dapt.errors import ConfigError
from lora_dapt.evaluate.forgetting import format_forgetting
from lora_dapt.evaluate.score import evaluate_blocks, evaluate_texts
from lora_dapt.model.load import load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.rundir import RunDir
from lora_dapt.train.pretrain import continued_pretrain

from .conftest import make_text

GENERAL = [make_text(40, seed=s) for s in (70, 71)]


def _blocks(tok, texts: list[str], seq_len: int = 32) -> Dataset:
    docs = [[tok.bos_token_id, *tok(t, add_special_tokens=False).input_ids, tok.eos_token_id] for t in texts]
    return Dataset.from_list(pack_documents(docs, seq_len, tok.pad_token_id))


def _corpus(tok):
    return SimpleNamespace(
        train=_blocks(tok, [make_text(25, s) for s in range(8)]),
        eval=_blocks(tok, [make_text(25, s) for s in range(100, 103)]),
        stats=None,
    )


def _run(model_dir, out, quantization="nf4", **eval_kw):
    loaded = load_base_model(model_dir, quantization=quantization, compute_dtype="float32")
    torch.manual_seed(0)
    model = apply_lora(loaded.model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    cfg = TrainConfig(
        output_dir=str(out), max_steps=3, learning_rate=1e-2, batch_size=2, gradient_accumulation_steps=1
    )
    corpus = _corpus(loaded.tokenizer)
    result = continued_pretrain(
        model,
        loaded.tokenizer,
        corpus,
        cfg,
        eval_config=EvalConfig(**eval_kw),
        general_texts=GENERAL,
        model_source=loaded.source,
    )
    return result, corpus, loaded.tokenizer


def _independent(model, tok, corpus) -> tuple[float, float]:
    domain = evaluate_blocks(model, corpus.eval, batch_size=4).ppl
    general = evaluate_texts(model, tok, GENERAL, batch_size=4).ppl
    return domain, general


def test_original_16bit_scores_equal_an_independent_scoring(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, corpus, tok = _run(tiny_model_dir, tmp_path / "run")
    before16, after16 = result.before["original_16bit"], result.after["original_16bit"]
    assert before16["dtype"] == "float32" and before16["plan"]["scored"] is True

    # the original, loaded with plain transformers (no quantization), then the saved adapter on it
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    domain, general = _independent(plain, tok, corpus)
    assert before16["domain"]["ppl"] == pytest.approx(domain, rel=1e-4)
    assert before16["general"]["ppl"] == pytest.approx(general, rel=1e-4)
    with_adapter = PeftModel.from_pretrained(plain, str(tmp_path / "run" / "adapter"))
    domain_a, general_a = _independent(with_adapter, tok, corpus)
    assert after16["domain"]["ppl"] == pytest.approx(domain_a, rel=1e-4)
    assert after16["general"]["ppl"] == pytest.approx(general_a, rel=1e-4)
    # the 16-bit model is not the 4-bit one: the two sets of figures differ
    assert abs(result.before["domain"]["ppl"] - before16["domain"]["ppl"]) > 1e-3

    # the headline is against the original, the 4-bit figures follow
    assert result.forgetting["domain"]["ppl_before"] == pytest.approx(domain, rel=1e-4)
    assert result.forgetting["general"]["ppl_after"] == pytest.approx(general_a, rel=1e-4)
    assert result.forgetting_as_trained["domain"]["ppl_before"] == result.before["domain"]["ppl"]
    assert result.forgetting_reference.startswith("the original 16-bit model (float32)")
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary["forgetting"] == result.forgetting and summary["original_base"]["scored"] is True
    table = format_forgetting(result.forgetting, result.forgetting_as_trained, result.forgetting_reference)
    lines = table.splitlines()
    assert lines[1].startswith("against the original 16-bit model") and lines[4].startswith("the 4-bit base")
    assert f"{domain:.2f}" in lines[2]
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.index("### Against the original 16-bit model") < report.index("### On the 4-bit base")
    # the metrics log holds the model as trained only: one row per split and phase
    rows = [r for r in RunDir(tmp_path / "run").read_metrics() if r["type"] == "eval"]
    assert [(r["phase"], r["split"]) for r in rows] == [
        ("before", "domain"),
        ("before", "general"),
        ("after", "domain"),
        ("after", "general"),
    ]


def test_original_that_does_not_fit_is_said_not_scored(tiny_model_dir, tmp_path, monkeypatch):
    import lora_dapt.evaluate.original as original

    monkeypatch.setattr(original, "free_memory_bytes", lambda device: 1000)
    result, _, _ = _run(tiny_model_dir, tmp_path / "small")
    plan = result.original_base
    assert plan["scored"] is False and plan["bytes_free"] == 1000 and plan["bytes_needed"] > 1000
    assert "does not fit in memory" in plan["reason"]
    assert "original_16bit" not in result.after and result.forgetting_as_trained == {}
    assert result.forgetting_reference == "the base as trained"
    report = (tmp_path / "small" / "report.md").read_text()
    assert "The original 16-bit model was not scored: the original 16-bit model does not fit" in report


def test_plan_true_that_cannot_fit_16bit_base_and_switch_off(tiny_model_dir):
    from lora_dapt.evaluate.original import original_plan
    from lora_dapt.model.load import ModelSource

    nf4 = ModelSource(name_or_path=str(tiny_model_dir), quantization="nf4")
    cpu = torch.device("cpu")
    with pytest.raises(
        ConfigError, match="eval.original_base = true: the original 16-bit model does not fit"
    ):
        original_plan(nf4, EvalConfig(original_base=True), cpu, free_memory=lambda device: 1000)
    fits = original_plan(nf4, EvalConfig(), cpu, free_memory=lambda device: 2**40)
    params = sum(p.numel() for p in load_base_model(tiny_model_dir, quantization=None).model.parameters())
    assert fits.scored and fits.dtype == "float32" and fits.bytes_needed == int(params * 4 * 1.25)
    sixteen = original_plan(ModelSource(name_or_path=str(tiny_model_dir)), EvalConfig(), cpu)
    assert not sixteen.scored and sixteen.reason.startswith("the base is 16-bit")
    off = original_plan(nf4, EvalConfig(original_base=False), cpu)
    assert not off.scored and off.reason == "eval.original_base is false"


def test_sixteen_bit_run_scores_once(tiny_model_dir, tmp_path):
    result, _, _ = _run(tiny_model_dir, tmp_path / "bf", quantization=None)
    assert result.original_base["reason"].startswith("the base is 16-bit")
    assert "original_16bit" not in result.after and result.forgetting_as_trained == {}
    assert result.forgetting["domain"]["ppl_before"] == result.before["domain"]["ppl"]
