"""Model cards (issue 17): the adapter's (written by training) and the merged model's (by the merge) name the
base as the user named it, never lora_dapt's GGUF cache, and hold the run's numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lora_dapt.config import AdapterConfig, DataConfig, EvalConfig, TrainConfig
from lora_dapt.data.corpus import prepare_corpus
from lora_dapt.export.card import source_name
from lora_dapt.export.merge import merge_run
from lora_dapt.model.load import ModelSource, load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.rundir import MERGE_REPORT, RunDir

from .conftest import make_text


def _row(card: str, label: str) -> str:
    """The value of a '| label | value |' row of a card."""
    m = re.search(rf"^\| {re.escape(label)} \| (.*?) \|$", card, re.M)
    assert m, f"no row {label!r} in the card"
    return m.group(1)


@pytest.fixture(scope="module")
def gguf_run(tiny_model_dir, tmp_path_factory):
    """A run whose base came from a GGUF file that has since moved away; ``tiny_model_dir`` stands in for
    lora_dapt's dequantized cache copy of it (ModelSource.resolved)."""
    tmp = tmp_path_factory.mktemp("card")
    files = []
    for i in range(10):
        p = tmp / "docs" / f"d{i}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(make_text(60 + 5 * i, seed=300 + i), encoding="utf-8")
        files.append(p)
    gguf_dir = tmp / "models-moved-away"
    source = ModelSource(
        name_or_path=str(gguf_dir),
        gguf_file="tiny-q8_0.gguf",
        resolved=str(tiny_model_dir),
        quantization="nf4",
        compute_dtype="float32",
    )
    model, tok = load_base_model(tiny_model_dir, quantization="nf4")
    torch.manual_seed(0)
    model = apply_lora(model, AdapterConfig(r=4, alpha=8, dropout=0.0, gradient_checkpointing=False))
    corpus = prepare_corpus(
        [str(p) for p in files], tok, DataConfig(seq_len=32, eval_fraction=0.2, cache_dir=str(tmp / "cache"))
    )
    cfg = TrainConfig(
        output_dir=str(tmp / "run"), max_steps=3, learning_rate=5e-3, gradient_accumulation_steps=1
    )
    result = continued_pretrain_run(model, tok, corpus, cfg, source)
    return tmp / "run", result, corpus, source, gguf_dir


def continued_pretrain_run(model, tok, corpus, cfg, source):
    from lora_dapt.train.pretrain import continued_pretrain

    general = [make_text(40, seed=900 + i) for i in range(3)]
    return continued_pretrain(
        model, tok, corpus, cfg, eval_config=EvalConfig(), general_texts=general, model_source=source
    )


def test_source_name():
    assert source_name("models/smollm2", "q8_0.gguf") == str(Path("models/smollm2") / "q8_0.gguf")
    assert source_name("models/q8_0.gguf", "q8_0.gguf") == "models/q8_0.gguf"
    assert source_name("org/model") == "org/model"


def test_adapter_records_and_card_names_the_gguf_not_the_cache(gguf_run, tiny_model_dir):
    run, result, corpus, source, gguf_dir = gguf_run
    want = str(gguf_dir / "tiny-q8_0.gguf")
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == want
    card = (run / "adapter" / "README.md").read_text()
    assert f"Base model: `{want}`" in card and str(tiny_model_dir) not in card
    assert "PeftModel.from_pretrained" in card
    # the run's numbers
    assert int(_row(card, "LoRA rank")) == 4 and float(_row(card, "LoRA alpha")) == 8
    assert float(_row(card, "learning rate")) == 5e-3
    assert int(_row(card, "steps")) == result.steps == 3
    assert int(_row(card, "tokens trained").replace(",", "")) == result.tokens_trained > 0
    assert int(_row(card, "seq_len")) == 32
    assert _row(card, "base quantization in training") == "nf4"
    stats = corpus.stats
    assert int(_row(card, "documents kept").replace(",", "")) == stats.documents_kept == 10
    assert int(_row(card, "eval documents").replace(",", "")) == stats.eval_documents == 2
    assert int(_row(card, "train tokens").replace(",", "")) == stats.train_tokens
    for split in ("domain", "general"):
        m = re.search(rf"^\| {split} \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+)% \|$", card, re.M)
        assert m, card
        # the headline figures: against the original 16-bit model (here the dequantized GGUF), as the summary
        assert result.forgetting_reference.startswith("the original 16-bit model")
        assert float(m.group(1)) == pytest.approx(result.before["original_16bit"][split]["ppl"], abs=1e-4)
        assert float(m.group(2)) == pytest.approx(result.after["original_16bit"][split]["ppl"], abs=1e-4)


def test_merged_card_and_merge_of_a_gguf_sourced_run(gguf_run, tiny_model_dir):
    run, result, _, _, gguf_dir = gguf_run
    out = merge_run(run, output_dir=run.parent / "merged")
    report = json.loads((out / MERGE_REPORT).read_text())
    want = str(gguf_dir / "tiny-q8_0.gguf")
    # merged from the cache copy (the GGUF moved away), recognised as the base the adapter records: no warning
    assert report["passed"] and report["problems"] == [] and report["base_name"] == want
    assert report["resolved_base"] == str(tiny_model_dir)
    card = (out / "README.md").read_text()
    assert f"Base model: `{want}`" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "PeftModel" not in card
    assert _row(card, "dtype") == f"{report['dtype']} (requested auto)"
    assert report["dtype"] == "float32"  # the tiny base is stored in float32: auto keeps it
    assert float(_row(card, "held-out perplexity, adapter")) == pytest.approx(
        report["perplexity_adapter"], abs=1e-4
    )
    assert float(_row(card, "held-out perplexity, merged")) == pytest.approx(
        report["perplexity_merged"], abs=1e-4
    )
    assert _row(card, "why this dtype") == report["dtype_reason"]
    assert int(_row(card, "steps")) == result.steps
    assert int(_row(card, "tokens trained").replace(",", "")) == result.tokens_trained
    assert RunDir(run).read_merge_report() is None  # merged elsewhere: the run's merged/ is untouched
