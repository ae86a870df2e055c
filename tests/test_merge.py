"""merge_adapter / merge_run on tiny random Llamas with non-zero LoRA weights (so a lost update shows)."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from lora_dapt.config import AdapterConfig, MergeConfig, ModelConfig
from lora_dapt.errors import ConfigError, MergeError
from lora_dapt.export import checks as checks_mod
from lora_dapt.export import job as job_mod
from lora_dapt.export.merge import merge_adapter, merge_run
from lora_dapt.model.load import ModelSource, load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.rundir import MERGE_REPORT

from .conftest import build_model, build_tokenizer, make_text

EVAL_TEXTS = [make_text(16, seed=500 + i) for i in range(3)]
TRAINED_16BIT = ModelConfig(quantization="none")  # the adapter was trained on an unquantized base


def _make_adapter(base_dir: Path, out: Path, *, train_embeddings: bool = False, seed: int = 0) -> Path:
    """QLoRA adapter with random (non-zero) A and B; trained embeddings/head perturbed away from the base."""
    torch.manual_seed(seed)
    model, tok = load_base_model(base_dir, quantization="nf4")
    cfg = AdapterConfig(
        r=4,
        alpha=8,
        dropout=0.0,
        init_lora_weights=False,
        train_embeddings=train_embeddings,
        gradient_checkpointing=False,
    )
    peft_model = apply_lora(model, cfg)
    if train_embeddings:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _ids(base_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    return tok(make_text(25, seed=7), return_tensors="pt")["input_ids"]


@torch.no_grad()
def _adapter_logits(
    base_dir: Path, adapter_dir: Path, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapter on the float32 base, bare float32 base) logits, computed independently of merge.py."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    plain = base(ids).logits.clone()
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return peft_model(ids).logits, plain


def _reload(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _merge(base: Path, adapter: Path, out: Path, **kw) -> Path:
    kw.setdefault("dtype", "float32")
    kw.setdefault("eval_texts", EVAL_TEXTS)
    return merge_adapter(base, adapter, out, **kw)


@pytest.fixture(scope="module")
def adapter_plain(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad_plain"))


@pytest.fixture(scope="module")
def adapter_tied_emb(tiny_tied_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(
        tiny_tied_model_dir, tmp_path_factory.mktemp("ad_tied"), train_embeddings=True, seed=1
    )


@pytest.fixture(scope="module")
def adapter_untied_emb(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad_untied"), train_embeddings=True, seed=2)


def test_merged_model_reloads_without_peft_and_matches_adapter(
    tiny_model_dir, adapter_plain, tmp_path, capsys
):
    out = _merge(tiny_model_dir, adapter_plain, tmp_path / "merged")
    assert out == tmp_path / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", MERGE_REPORT} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert "adapter_config.json" not in names and not (tmp_path / "merged.partial").exists()

    ids = _ids(tiny_model_dir)
    want, plain = _adapter_logits(tiny_model_dir, adapter_plain, ids)
    with torch.no_grad():
        got = _reload(out)(ids).logits
    assert (
        want - plain
    ).abs().max() > 0.1  # the adapter changes the model, so the comparison means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["passed"] is True
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["adapter_effect"] > 0.1
    assert report["eval_texts"] == 3 and report["eval_tokens"] > 20
    losses = report["losses"]
    assert abs(losses["merged"]["loss"] - losses["adapter_16bit_original"]["loss"]) < 1e-4
    assert losses["adapter_4bit_as_trained"]["loss"] > 0
    assert "adapter_16bit_dequantized" not in losses  # measured only with base_source='dequantized'
    for r in (losses["adapter_4bit_as_trained"], losses["adapter_16bit_original"], losses["merged"]):
        assert math.isfinite(r["loss"]) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["tokens"] == report["eval_tokens"]
    assert report["max_abs_logit_diff"] <= report["tolerance"] * report["logit_scale"]
    assert report["max_abs_logit_diff_4bit_vs_16bit"] > 0  # NF4 rounding shows in the logits
    # With base_source='original' the 4-bit loss (a) stands in for the dequantized base, which is then exact.
    assert report["closer_to_trained"] == "dequantized"
    as_trained, original = losses["adapter_4bit_as_trained"]["loss"], losses["adapter_16bit_original"]["loss"]
    assert report["lower_loss"] == ("dequantized" if as_trained <= original else "original")
    assert report["trained_quantization"] == "nf4" and report["base_source"] == "original"
    assert report["output_dir"] == str(out) and report["problems"] == []
    # The merged loss is the plain mean next-token cross-entropy of the reloaded model on the eval texts.
    tok = AutoTokenizer.from_pretrained(out)
    reloaded = _reload(out)
    nll = count = 0
    with torch.no_grad():
        for text in EVAL_TEXTS:
            x = tok(text, return_tensors="pt")["input_ids"]
            logits = reloaded(x).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
    assert count == report["eval_tokens"]
    assert losses["merged"]["loss"] == pytest.approx(nll / count, abs=1e-5)
    printed = capsys.readouterr().out
    assert "merge PASSED" in printed and f"{report['eval_tokens']} tokens" in printed


def test_trained_tied_embeddings_stay_tied(tiny_tied_model_dir, adapter_tied_emb, tmp_path):
    out = _merge(tiny_tied_model_dir, adapter_tied_emb, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys

    model = _reload(out)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()
    trained = load_file(str(adapter_tied_emb / "adapter_model.safetensors"))
    torch.testing.assert_close(emb, trained["base_model.model.model.embed_tokens.weight"])
    base_emb = _reload(tiny_tied_model_dir).get_input_embeddings().weight
    assert (emb - base_emb).abs().max() > 0.01  # the trained embeddings were not dropped

    ids = _ids(tiny_tied_model_dir)
    want, _ = _adapter_logits(tiny_tied_model_dir, adapter_tied_emb, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)
    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["tied_embeddings"] is True and report["trained_embeddings"] is True


def test_trained_untied_embeddings_and_head_are_merged(tiny_model_dir, adapter_untied_emb, tmp_path):
    out = _merge(tiny_model_dir, adapter_untied_emb, tmp_path / "merged")
    model = _reload(out)
    trained = load_file(str(adapter_untied_emb / "adapter_model.safetensors"))
    torch.testing.assert_close(
        model.get_input_embeddings().weight, trained["base_model.model.model.embed_tokens.weight"]
    )
    torch.testing.assert_close(
        model.get_output_embeddings().weight, trained["base_model.model.lm_head.weight"]
    )
    ids = _ids(tiny_model_dir)
    want, _ = _adapter_logits(tiny_model_dir, adapter_untied_emb, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_dequantized_base_reproduces_the_trained_4bit_model(tiny_model_dir, adapter_plain, tmp_path):
    # How training loaded the base, as load_base_model records it (what run_info.json holds).
    trained = ModelSource(name_or_path=str(tiny_model_dir), quantization="nf4", compute_dtype="float32")
    out = _merge(
        tiny_model_dir, adapter_plain, tmp_path / "merged", base_source="dequantized", trained_on=trained
    )
    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["passed"] is True and report["base_source"] == "dequantized"
    assert report["trained_quantization"] == "nf4"
    losses = report["losses"]
    as_trained = losses["adapter_4bit_as_trained"]["loss"]
    assert abs(losses["merged"]["loss"] - losses["adapter_16bit_dequantized"]["loss"]) < 1e-4
    # The dequantized merge is the 4-bit model as trained (up to kernel rounding); the original is not.
    gap_dequantized = abs(losses["merged"]["loss"] - as_trained)
    gap_original = abs(losses["adapter_16bit_original"]["loss"] - as_trained)
    assert gap_dequantized < 0.25 * gap_original
    assert report["closer_to_trained"] == "dequantized"
    # Merged weights differ from the original ones by more than the LoRA update: the NF4 rounding is in them.
    merged_w = _reload(out).model.layers[0].mlp.down_proj.weight
    orig_w = _reload(tiny_model_dir).model.layers[0].mlp.down_proj.weight
    assert (merged_w - orig_w).abs().max() > 1e-3


def test_bfloat16_merge_saves_bfloat16(tiny_model_dir, adapter_plain, tmp_path):
    out = _merge(
        tiny_model_dir,
        adapter_plain,
        tmp_path / "merged",
        dtype="bfloat16",
        tolerance=0.1,
        trained_on=TRAINED_16BIT,
    )
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["passed"] and 0 < report["max_abs_logit_diff"] < 0.1 * report["logit_scale"]


def test_failed_verification_is_loud_and_not_shipped(tiny_model_dir, adapter_plain, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="does not reproduce the adapter"):
        _merge(tiny_model_dir, adapter_plain, out, tolerance=1e-12, trained_on=TRAINED_16BIT)
    assert not out.exists()
    report = json.loads((tmp_path / "merged.partial" / MERGE_REPORT).read_text())
    assert report["passed"] is False and report["problems"]
    assert report["max_abs_logit_diff"] > report["tolerance"] * report["logit_scale"]
    assert report["output_dir"] == str(tmp_path / "merged.partial")
    assert (
        report["trained_quantization"] == "none" and report["losses"].get("adapter_4bit_as_trained") is None
    )
    assert report["closer_to_trained"] is None and "base_source does not matter" in report["advice"]


def test_settings_are_checked_by_merge_config(tiny_model_dir, adapter_plain, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(ConfigError, match="bogus_key: unknown key") as err:
        merge_adapter(tiny_model_dir, adapter_plain, out, bogus_key=1)
    assert "cannot merge" in str(err.value)
    with pytest.raises(ConfigError, match="dtpye: unknown key; did you mean 'dtype'"):
        merge_adapter(tiny_model_dir, adapter_plain, out, dtpye="float32")
    with pytest.raises(ConfigError, match=r"dtype = 'float64'.*(\n.*)*tolerance = -1\.0: must be > 0"):
        merge_adapter(tiny_model_dir, adapter_plain, out, dtype="float64", tolerance=-1)
    with pytest.raises(ConfigError, match="base_source = 'dequantized' needs the quantization"):
        merge_adapter(
            tiny_model_dir,
            adapter_plain,
            out,
            MergeConfig(base_source="dequantized"),
            trained_on=TRAINED_16BIT,
        )
    with pytest.raises(ConfigError, match="expected a MergeConfig"):
        merge_adapter(tiny_model_dir, adapter_plain, out, "float32")
    assert not out.exists() and not (tmp_path / "merged.partial").exists()


def test_config_and_overrides_combine(tiny_model_dir, adapter_plain, tmp_path):
    cfg = MergeConfig(dtype="bfloat16", tolerance=0.5)
    out = _merge(tiny_model_dir, adapter_plain, tmp_path / "merged", config=cfg, trained_on=TRAINED_16BIT)
    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["dtype"] == "float32" and report["tolerance"] == 0.5  # the override wins, the rest stays
    assert report["passed"] is True


def test_nan_adapter_is_refused(tiny_model_dir, adapter_plain, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_plain, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match=r"corrupted.*layers\.1\.mlp\.up_proj\.lora_B.*1 NaN"):
        _merge(tiny_model_dir, bad, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_mismatched_base_names_both(adapter_plain, tmp_path):
    other = tmp_path / "other_base"
    tok = build_tokenizer(other)
    build_model(other, len(tok), hidden=32)
    recorded = json.loads((adapter_plain / "adapter_config.json").read_text())["base_model_name_or_path"]
    with pytest.raises(MergeError, match="base model mismatch") as err:
        _merge(other, adapter_plain, tmp_path / "merged")
    msg = str(err.value)
    assert recorded in msg and str(other) in msg
    assert "hidden_size: 64 vs 32" in msg


def test_shape_mismatch_is_reported_per_tensor(tiny_model_dir, adapter_plain, tmp_path):
    moved = tmp_path / "moved"  # the recorded base no longer exists: only the shape check can catch it
    shutil.copytree(adapter_plain, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/some-other-model"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(moved / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, str(moved / "adapter_model.safetensors"))
    with pytest.raises(
        MergeError, match=r"org/some-other-model.*(\n.*)*q_proj: lora_A expects 48 input features"
    ):
        _merge(tiny_model_dir, moved, tmp_path / "merged")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_adapter_bin_is_never_executed(tiny_model_dir, adapter_plain, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(adapter_plain / "adapter_config.json", evil)
    marker = tmp_path / "marker.txt"
    with open(evil / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil(marker)}, f)
    with pytest.raises(MergeError, match="refusing to load .*adapter_model.bin"):
        _merge(tiny_model_dir, evil, tmp_path / "merged")
    assert not marker.exists()


def test_plain_tensor_adapter_bin_is_loaded_safely(tiny_model_dir, adapter_plain, tmp_path):
    as_bin = tmp_path / "as_bin"
    as_bin.mkdir()
    shutil.copy(adapter_plain / "adapter_config.json", as_bin)
    torch.save(load_file(str(adapter_plain / "adapter_model.safetensors")), as_bin / "adapter_model.bin")
    out = _merge(tiny_model_dir, as_bin, tmp_path / "merged", trained_on=TRAINED_16BIT)
    ids = _ids(tiny_model_dir)
    want, _ = _adapter_logits(tiny_model_dir, adapter_plain, ids)
    with torch.no_grad():
        torch.testing.assert_close(_reload(out)(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_too_little_disk_space_is_refused(tiny_model_dir, adapter_plain, tmp_path, monkeypatch):
    monkeypatch.setattr(checks_mod, "free_bytes", lambda path: 1000)
    with pytest.raises(MergeError, match=r"not enough disk space .* GiB needed \(float32\)"):
        _merge(tiny_model_dir, adapter_plain, tmp_path / "merged")


def test_existing_output_needs_overwrite(tiny_model_dir, adapter_plain, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        _merge(tiny_model_dir, adapter_plain, out)
    assert (out / "keep.txt").exists()


def _run_dir(tmp_path: Path, base: Path, adapter: Path, *, gguf_file: str | None = None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    config = {
        "model": {"name_or_path": str(base), "quantization": "nf4", "gguf_file": gguf_file},
        "merge": {"dtype": "float32"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    info = {
        "base_model": {
            "name_or_path": str(base),
            "gguf_file": gguf_file,
            "resolved": str(base),
            "quantization": "nf4",
            "compute_dtype": "float32",
        }
    }
    (run / "run_info.json").write_text(json.dumps(info))
    (run / "eval_texts.json").write_text(json.dumps(EVAL_TEXTS + [make_text(20, seed=9)]))
    return run


def test_merge_run_reads_the_run_directory(tiny_model_dir, adapter_plain, tmp_path):
    run = _run_dir(tmp_path, tiny_model_dir, adapter_plain)
    out = merge_run(run)
    assert out == run / "merged"
    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["dtype"] == "float32" and report["trained_quantization"] == "nf4"
    assert "eval split" in report["eval_source"] and report["eval_texts"] == 4
    assert report["passed"] is True
    assert report["losses"]["adapter_4bit_as_trained"]["tokens"] == report["eval_tokens"] > 0
    assert report["max_abs_logit_diff"] <= report["tolerance"] * report["logit_scale"]


def test_merge_run_passes_the_gguf_file_on(tiny_model_dir, adapter_plain, tmp_path, monkeypatch):
    seen = []

    def fake_resolve(name_or_path, gguf_file=None):
        seen.append((str(name_or_path), gguf_file))
        return tiny_model_dir  # stands in for the dequantized GGUF checkpoint

    monkeypatch.setattr(job_mod, "resolve_model_source", fake_resolve)
    gguf_dir = tmp_path / "gguf_model"
    gguf_dir.mkdir()
    run = _run_dir(tmp_path, gguf_dir, adapter_plain, gguf_file="tiny-q8_0.gguf")
    out = merge_run(run, output_dir=tmp_path / "out", dtype="float32")
    assert seen == [(str(gguf_dir), "tiny-q8_0.gguf")]
    assert json.loads((out / MERGE_REPORT).read_text())["resolved_base"] == str(tiny_model_dir)


def test_sft_adapter_with_added_tokens(tiny_model_dir, tmp_path):
    """An SFT run that added tokens: the adapter's embeddings/head are larger than the base's."""
    torch.manual_seed(3)
    model, tok = load_base_model(tiny_model_dir, quantization="nf4")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    model.resize_token_embeddings(len(tok))
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0, init_lora_weights=False, train_embeddings=True)
    peft_model = apply_lora(model, cfg, gradient_checkpointing=False)
    adapter = tmp_path / "sft_adapter"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)

    out = _merge(tiny_model_dir, adapter, tmp_path / "merged", eval_texts=["<|user|> " + EVAL_TEXTS[0]])
    merged = _reload(out)
    assert merged.get_input_embeddings().weight.shape[0] == len(tok) == merged.config.vocab_size
    trained = load_file(str(adapter / "adapter_model.safetensors"))
    torch.testing.assert_close(
        merged.get_output_embeddings().weight, trained["base_model.model.lm_head.weight"]
    )
    assert json.loads((out / MERGE_REPORT).read_text())["passed"] is True


# -- dtype 'auto' (issue 17) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    """The tiny Llama stored in bfloat16 (config torch_dtype bfloat16), as SmolLM2 is."""
    d = tmp_path_factory.mktemp("tiny_bf16")
    tok = build_tokenizer(d)
    build_model(d, len(tok)).to(torch.bfloat16).save_pretrained(d)
    return d


def _small_update_adapter(base: Path, out: Path, b_value: float) -> Path:
    """LoRA with B = b_value everywhere and A = +-1: every element of BA is a multiple of b_value, far below
    the bf16 spacing of weights of about 0.2 (2^-8 x 0.2 = 8e-4) for b_value = 1e-4."""
    torch.manual_seed(0)
    model, tok = load_base_model(base, quantization=None, compute_dtype="float32")
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0, init_lora_weights=False, gradient_checkpointing=False)
    peft_model = apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(b_value)
            elif "lora_A" in name:
                p.copy_(torch.randn_like(p).sign())
    peft_model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_auto_widens_exactly_when_bf16_loses_the_update(bf16_base, tmp_path, capsys):
    adapter = _small_update_adapter(bf16_base, tmp_path / "small", 1e-4)
    out = merge_adapter(
        bf16_base, adapter, tmp_path / "merged", trained_on=TRAINED_16BIT, eval_texts=EVAL_TEXTS
    )
    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["dtype_requested"] == "auto" and report["dtype"] == "float16" and report["passed"]
    bf16, fp16 = report["dtype_trials"]
    assert (bf16["dtype"], bf16["passed"], fp16["dtype"], fp16["passed"]) == (
        "bfloat16",
        False,
        "float16",
        True,
    )
    assert bf16["max_abs_logit_diff"] > bf16["allowed_logit_diff"] >= fp16["max_abs_logit_diff"]
    assert bf16["update_erased"] > 0.5 and bf16["layers_mostly_erased"] == bf16["lora_layers"] == 14
    assert fp16["update_erased"] < 0.2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float16
    assert (
        f"bfloat16 rounding erased {100 * bf16['update_erased']:.0f}% of the update" in report["dtype_reason"]
    )
    assert report["dtype_reason"].endswith("saved as float16")
    printed = capsys.readouterr().out
    assert report["dtype_reason"] in printed and "held-out perplexity: merged" in printed
    # perplexity check: both reported, equal within the tolerance
    rel = abs(report["perplexity_merged"] / report["perplexity_adapter"] - 1)
    assert report["ppl_rel_diff"] == pytest.approx(rel) and rel <= report["ppl_tolerance"] == 5e-3
    assert report["perplexity_merged"] == pytest.approx(report["losses"]["merged"]["perplexity"])


def test_auto_keeps_bf16_when_the_update_survives(bf16_base, tmp_path):
    adapter = _make_adapter(
        bf16_base, tmp_path / "big", seed=4
    )  # random A, B: an update far above bf16 spacing
    out = merge_adapter(
        bf16_base,
        adapter,
        tmp_path / "merged",
        trained_on=TRAINED_16BIT,
        eval_texts=EVAL_TEXTS,
        tolerance=0.1,
    )
    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["dtype"] == "bfloat16" and [t["dtype"] for t in report["dtype_trials"]] == ["bfloat16"]
    assert report["dtype_trials"][0]["passed"] and report["dtype_trials"][0]["update_erased"] < 0.05
    assert report["dtype_reason"].startswith("auto: the base's own dtype bfloat16 keeps the update")


def test_explicit_bf16_that_fails_names_the_dtype_that_passes(bf16_base, tmp_path):
    adapter = _small_update_adapter(bf16_base, tmp_path / "small", 1e-4)
    with pytest.raises(MergeError, match=r"\(bfloat16\) does not reproduce[\s\S]*dtype='float16' passes"):
        merge_adapter(
            bf16_base,
            adapter,
            tmp_path / "m",
            dtype="bfloat16",
            trained_on=TRAINED_16BIT,
            eval_texts=EVAL_TEXTS,
        )
    report = json.loads((tmp_path / "m.partial" / MERGE_REPORT).read_text())
    assert report["dtype"] == "bfloat16" and report["dtype_requested"] == "bfloat16" and not report["passed"]
    assert [(t["dtype"], t["passed"]) for t in report["dtype_trials"]] == [
        ("bfloat16", False),
        ("float16", True),
    ]
    # a stricter tolerance that float16 misses: float32 is named
    with pytest.raises(MergeError, match=r"dtype='float32' passes"):
        merge_adapter(
            bf16_base,
            adapter,
            tmp_path / "m2",
            dtype="bfloat16",
            tolerance=2e-3,
            trained_on=TRAINED_16BIT,
            eval_texts=EVAL_TEXTS,
        )


def test_perplexity_check_fails_a_merge_beyond_ppl_tolerance(tiny_model_dir, adapter_plain, tmp_path):
    with pytest.raises(
        MergeError, match=r"held-out perplexity of the merged model .* \(> ppl_tolerance 1e-09\)"
    ):
        _merge(tiny_model_dir, adapter_plain, tmp_path / "m", ppl_tolerance=1e-9, trained_on=TRAINED_16BIT)
    report = json.loads((tmp_path / "m.partial" / MERGE_REPORT).read_text())
    assert report["ppl_rel_diff"] > 1e-9 and report["max_abs_logit_diff"] < 1e-4
