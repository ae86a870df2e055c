"""Domain vocabulary on a 4-bit base: mining, row initialisation, training only the new rows, merge, GGUF,
the `vocab` preview, and bits per byte of packed blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import lora_dapt as ld
from lora_dapt import AdapterConfig, DataConfig, EvalConfig, TrainConfig
from lora_dapt.data.corpus import prepare_corpus
from lora_dapt.data.vocab import extend_vocabulary, retokenize_blocks, tokens_per_char
from lora_dapt.errors import ConfigError
from lora_dapt.evaluate.score import evaluate_blocks
from lora_dapt.model.load import load_base_model, load_base_model_from
from lora_dapt.model.lora import apply_lora
from lora_dapt.model.loss import causal_lm_loss_sum
from lora_dapt.model.vocab import add_token_rows
from lora_dapt.train.pretrain import continued_pretrain

from .conftest import make_text

N_TOKENS = 20
TEXTS = [make_text(150, 2000 + i) for i in range(30)]


def data_config(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"seq_len": 64, "eval_fraction": 0.2, "cache_dir": str(tmp_path / "cache"), **kw})


def grown_base(model_dir, tokenizer, quantization="nf4"):
    """The base as a run with ``tokenizer`` starts: loaded, grown, rows initialised."""
    model, old = load_base_model(model_dir, quantization=quantization, compute_dtype="float32")
    return model, old, add_token_rows(model, old, tokenizer)


@pytest.fixture(scope="module")
def extension(tiny_model_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = data_config(tmp_path_factory.mktemp("vocab"))
    return tok, extend_vocabulary(tok, [TEXTS], n_tokens=N_TOKENS, min_frequency=2, config=cfg), cfg


def test_new_tokens_cut_tokens_per_char_on_held_out_text(extension):
    tok, ext, cfg = extension
    held = prepare_corpus([TEXTS], tok, cfg).eval_documents  # the corpus's own held-out documents
    assert ext.documents["held_out"] == len(held) == 6
    assert ext.documents["mining"] + ext.documents["selection"] == len(TEXTS) - len(held)
    by_hand = sum(len(tok(t, add_special_tokens=False).input_ids) for t in held) / sum(map(len, held))
    assert ext.domain_before == pytest.approx(by_hand)
    assert ext.domain_after == pytest.approx(tokens_per_char(ext.tokenizer, held))
    assert ext.domain_after < 0.9 * ext.domain_before
    assert len(ext.tokenizer) == len(tok) + len(ext.new_tokens) and 0 < len(ext.new_tokens) <= N_TOKENS
    assert len(tok) == 320  # the input tokenizer is not changed
    for t in ext.new_tokens:  # whole words after a space, one token each now, several before
        assert t.startswith(" ") and len(ext.tokenizer(t, add_special_tokens=False).input_ids) == 1
        assert len(tok(t, add_special_tokens=False).input_ids) > 1
    ids = ext.tokenizer(held[0], add_special_tokens=False).input_ids
    assert ext.tokenizer.decode(ids) == held[0]  # lossless


def test_only_byte_level_bpe_is_supported(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConfigError, match="supports byte-level BPE tokenizers .* WordLevel model"):
        extend_vocabulary(PreTrainedTokenizerFast(tokenizer_object=wl), [TEXTS], config=data_config(tmp_path))


def test_new_rows_start_as_the_mean_of_their_sub_token_rows_on_a_4bit_base(tiny_model_dir, extension):
    _, ext, _ = extension
    plain, _ = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    old_emb, old_head = plain.get_input_embeddings().weight.detach(), plain.lm_head.weight.detach()
    model, old, rows = grown_base(tiny_model_dir, ext.tokenizer)
    # bitsandbytes quantized the decoder's linear layers only: embeddings and head are plain 16/32-bit
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    n_new = len(ext.new_tokens)
    assert rows.token_ids == list(range(320, 320 + n_new)) and (rows.rows_before, rows.rows_after) == (
        320,
        384,
    )
    emb, head = model.get_input_embeddings().weight.detach(), model.lm_head.weight.detach()
    assert emb.shape == head.shape == (384, 64) and model.config.vocab_size == 384
    assert torch.equal(emb[:320], old_emb) and torch.equal(head[:320], old_head)  # old rows untouched
    for i in rows.token_ids:
        sub = old(ext.tokenizer.decode([i]), add_special_tokens=False).input_ids
        assert rows.sub_tokens[i] == sub and len(sub) > 1
        torch.testing.assert_close(emb[i], old_emb[sub].mean(0))
        torch.testing.assert_close(head[i], old_head[sub].mean(0))
    pad = range(320 + n_new, 384)  # rows no token uses: the mean of all old rows
    torch.testing.assert_close(emb[pad.start :], old_emb.mean(0).expand(len(pad), -1))
    torch.testing.assert_close(head[pad.start :], old_head.mean(0).expand(len(pad), -1))


@pytest.fixture(scope="module")
def pipeline_run(tiny_model_dir, extension, tmp_path_factory):
    """lora-dapt train with adapter.new_tokens on the tiny untied model, merged in float32."""
    tmp = tmp_path_factory.mktemp("vocab_run")
    for i, t in enumerate(TEXTS):
        (tmp / f"doc{i:02d}.txt").write_text(t)
    cfg = ld.RunConfig.from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir), "quantization": "nf4", "compute_dtype": "float32"},
            "adapter": {
                "r": 4,
                "alpha": 8,
                "dropout": 0.0,
                "new_tokens": N_TOKENS,
                "new_tokens_min_frequency": 2,
                "gradient_checkpointing": False,
            },
            "data": {**data_config(tmp).to_dict(), "sources": [str(tmp / "doc*.txt")]},
            "train": {
                "output_dir": str(tmp / "run"),
                "max_steps": 4,
                "batch_size": 2,
                "gradient_accumulation_steps": 1,
                "learning_rate": 1e-2,
                "embedding_learning_rate": 1e-2,
                "warmup_steps": 0,
            },
            "eval": {"general": False},
            "merge": {"enabled": True, "dtype": "float32"},
        }
    )
    return cfg, ld.run(cfg), tmp / "run"


@pytest.mark.slow  # the whole pipeline (train, evaluate, merge): ~35 s on 2 cores
def test_pipeline_trains_only_new_rows_and_lora_and_saves_a_small_adapter(
    tiny_model_dir, extension, pipeline_run
):
    _, ext, _ = extension
    _, result, run_dir = pipeline_run
    adapter = run_dir / "adapter"
    saved_tok = AutoTokenizer.from_pretrained(adapter)  # the extended tokenizer is saved with the adapter
    assert saved_tok.get_vocab() == ext.tokenizer.get_vocab()
    n_new = len(ext.new_tokens)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    rows = {k: v for k, v in tensors.items() if "lora_" not in k}
    assert sorted(rows) == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
    ]
    assert all(v.shape == (n_new, 64) for v in rows.values())
    row_bytes = sum(v.numel() * v.element_size() for v in rows.values())
    assert row_bytes / (2 * 384 * 64 * 4) < 0.1  # both grown fp32 matrices would be 196,608 bytes
    assert all(bool(v.abs().sum() > 0) for k, v in tensors.items() if "lora_B" in k)  # LoRA trained
    # the merged model: every old and padding row bit-identical to the grown base, the new rows trained
    start, _, _ = grown_base(tiny_model_dir, ext.tokenizer, quantization=None)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    new = torch.zeros(384, dtype=torch.bool)
    new[320 : 320 + n_new] = True
    for a, b in ((start.model.embed_tokens, merged.model.embed_tokens), (start.lm_head, merged.lm_head)):
        assert torch.equal(a.weight[~new], b.weight[~new])
        assert not torch.isclose(a.weight[new], b.weight[new]).all(dim=1).any()  # every new row moved
    # packed blocks carry bytes: domain bits per byte is a number before and after
    domain = result.forgetting["domain"]
    assert isinstance(domain["bpb_before"], float) and domain["bpb_after"] < domain["bpb_before"]


@pytest.mark.slow  # the whole pipeline (train, evaluate, merge): ~35 s on 2 cores
def test_merged_model_and_tokenizer_reload_in_plain_transformers_and_match_the_adapter(
    tiny_model_dir, extension, pipeline_run
):
    from peft import PeftModel

    _, ext, _ = extension
    _, _, run_dir = pipeline_run
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    assert tok.get_vocab() == ext.tokenizer.get_vocab() and merged.config.vocab_size == 384
    text = " the plaintiff" + "".join(ext.new_tokens[:5]) + " tenant"
    ids = tok(text, return_tensors="pt").input_ids
    assert (ids >= 320).sum() >= 5  # new tokens are in the input
    base, _, _ = grown_base(tiny_model_dir, tok, quantization=None)
    adapter = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=1e-4)
    report = json.loads((run_dir / "merged" / "merge_report.json").read_text())
    assert report["passed"] is True


@pytest.mark.slow  # the whole pipeline (train, evaluate, merge): ~35 s on 2 cores
def test_gguf_file_carries_the_new_tokens(extension, pipeline_run, tmp_path):
    """The GGUF writer stores the new tokens as USER_DEFINED (llama.cpp matches those in the raw text) and
    the padding rows as UNUSED [PAD<id>]. (export_gguf's own check, which puts back the USER_DEFINED tokens
    transformers' GGUF reader drops, is tested in test_gguf.py.)"""
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from lora_dapt.export.gguf import write_gguf

    _, ext, _ = extension
    merged = pipeline_run[2] / "merged"
    write_gguf(merged, tmp_path / "m.gguf", AutoTokenizer.from_pretrained(merged), "f16")
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    types = reader.fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data]
    n_new = len(ext.new_tokens)
    assert len(tokens) == 384 and tokens[320 : 320 + n_new] == ext.new_tokens
    assert (
        set(kinds[320 : 320 + n_new]) == {4} and kinds[383] == 5 and tokens[383] == "[PAD383]"
    )  # USER_DEFINED, UNUSED


def test_a_tied_model_stays_tied(tiny_tied_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tied_model_dir)
    cfg = data_config(tmp_path)
    ext = extend_vocabulary(tok, [TEXTS], n_tokens=N_TOKENS, min_frequency=2, config=cfg)
    model, _, rows = grown_base(tiny_tied_model_dir, ext.tokenizer)
    assert rows.tied and model.lm_head.weight is model.model.embed_tokens.weight
    torch.manual_seed(0)
    peft_model = apply_lora(
        model,
        AdapterConfig(r=4, alpha=8, dropout=0.0, gradient_checkpointing=False),
        trainable_tokens=rows.token_ids,
    )
    emb = peft_model.base_model.model.model.embed_tokens.token_adapter
    head = peft_model.base_model.model.lm_head.token_adapter
    assert head.trainable_tokens_delta["default"] is emb.trainable_tokens_delta["default"]  # one copy
    corpus = prepare_corpus([TEXTS], ext.tokenizer, cfg)
    train = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, learning_rate=1e-2)
    continued_pretrain(peft_model, ext.tokenizer, corpus, train, eval_config=EvalConfig(enabled=False))
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        rows_saved = [k for k in f.keys() if "lora_" not in k]  # noqa: SIM118
    assert rows_saved == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    merged_dir = ld.merge_adapter(
        str(tiny_tied_model_dir),
        tmp_path / "run" / "adapter",
        tmp_path / "merged",
        dtype="float32",
        trained_on=ld.ModelConfig(name_or_path=str(tiny_tied_model_dir), compute_dtype="float32"),
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    assert merged.model.embed_tokens.weight.shape == (384, 64)


def test_domain_bits_per_byte_of_packed_blocks_by_hand(tiny_model_dir, tmp_path):
    """Documents longer than a block are split: bytes are shared out and add up to the documents' bytes."""
    model, tok = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    texts = [make_text(60 + 9 * i, 300 + i) for i in range(10)]
    corpus = prepare_corpus([texts], tok, data_config(tmp_path, seq_len=32, eval_fraction=0.3))
    held = corpus.eval_documents
    n_bytes = sum(len(t.encode("utf-8")) for t in held)
    assert corpus.stats.eval_blocks > len(held)  # documents were cut across blocks
    assert sum(corpus.eval["bytes"]) == n_bytes
    nll = 0.0
    with torch.no_grad():
        for row in corpus.eval:
            total, _ = causal_lm_loss_sum(
                model,
                torch.tensor([row["input_ids"]]),
                torch.tensor([row["labels"]]),
                torch.tensor([row["position_ids"]]),
            )
            nll += float(total)
    result = evaluate_blocks(model, corpus.eval, batch_size=3)
    assert result.bytes == n_bytes
    assert result.bits_per_byte == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)


def test_vocab_command_previews_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    from lora_dapt.cli.main import main

    for i, t in enumerate(TEXTS):
        (tmp_path / f"doc{i:02d}.txt").write_text(t)
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "adapter": {"new_tokens": 5, "new_tokens_min_frequency": 2},
        "data": {
            "sources": [str(tmp_path / "doc*.txt")],
            "seq_len": 64,
            "eval_fraction": 0.2,
            "cache_dir": str(tmp_path / "c"),
        },
        "eval": {"general": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["vocab", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "vocabulary: +5 tokens" in out and "tokens per character" in out and "' liability'" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache, no run directory


class _StopAt(TrainerCallback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if self.step is not None and state.global_step == self.step:
            control.should_training_stop = True


def _token_run(model_dir, tokenizer, corpus, out, *, eval_config, stop_at=None, resume=None, save_every=0):
    """A tiny QLoRA run training the new rows; returns (peft model, result)."""
    model, _, rows = grown_base(model_dir, tokenizer)
    torch.manual_seed(0)
    peft_model = apply_lora(
        model,
        AdapterConfig(r=4, alpha=8, dropout=0.0, gradient_checkpointing=False),
        trainable_tokens=rows.token_ids,
    )
    cfg = TrainConfig(
        output_dir=str(out),
        max_steps=6,
        batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        embedding_learning_rate=1e-2,
        warmup_steps=0,
        save_every=save_every,
        resume_from=resume,
    )
    source = load_base_model_from(ld.ModelConfig(name_or_path=str(model_dir), compute_dtype="float32")).source
    result = continued_pretrain(
        peft_model,
        tokenizer,
        corpus,
        cfg,
        eval_config=eval_config,
        general_texts=TEXTS[:2],
        model_source=source,
        callbacks=[_StopAt(stop_at)],
    )
    return peft_model, result


def test_blocks_retokenized_for_the_base_cover_the_same_text(extension, tmp_path):
    tok, ext, cfg = extension
    corpus = prepare_corpus([TEXTS], ext.tokenizer, cfg)
    assert max(max(r["input_ids"]) for r in corpus.eval) >= 320  # the run's blocks hold new tokens
    base = retokenize_blocks(corpus.eval, ext.tokenizer, tok)
    assert (
        sum(base["bytes"]) == sum(corpus.eval["bytes"]) == sum(len(t.encode()) for t in corpus.eval_documents)
    )
    assert max(max(r) for r in base["input_ids"]) < 320 and len(base) > len(corpus.eval)

    # the same text: decoded (special tokens and padding left out), both hold every held-out byte
    def text_bytes(blocks, tokenizer):
        return sum(len(tokenizer.decode(r, skip_special_tokens=True).encode()) for r in blocks["input_ids"])

    assert text_bytes(base, tok) == text_bytes(corpus.eval, ext.tokenizer) == sum(base["bytes"])


def test_original_16bit_scores_a_run_with_new_tokens(tiny_model_dir, extension, tmp_path):
    """'before': the original WITHOUT the new rows, on the base tokenizer's blocks and texts; 'after': the
    original grown as training grew its base, with the adapter, on the run's; both are checked against an
    independent scoring, and bits per byte covers the same bytes on both sides."""
    from peft import PeftModel

    from lora_dapt.evaluate.score import evaluate_texts

    tok, ext, cfg = extension
    corpus = prepare_corpus([TEXTS], ext.tokenizer, cfg)
    _, result = _token_run(tiny_model_dir, ext.tokenizer, corpus, tmp_path / "run", eval_config=EvalConfig())
    before, after = result.before["original_16bit"], result.after["original_16bit"]
    assert (before["tokenizer"], after["tokenizer"]) == ("base", "run") and before["plan"]["scored"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert plain.get_input_embeddings().weight.shape[0] == 320
    base_blocks = retokenize_blocks(corpus.eval, ext.tokenizer, tok)
    domain = evaluate_blocks(plain, base_blocks)
    assert before["domain"]["loss"] == pytest.approx(domain.loss, rel=1e-5)
    assert before["general"]["loss"] == pytest.approx(evaluate_texts(plain, tok, TEXTS[:2]).loss, rel=1e-5)
    grown, _, _ = grown_base(tiny_model_dir, ext.tokenizer, quantization=None)
    adapted = PeftModel.from_pretrained(grown, str(tmp_path / "run" / "adapter")).eval()
    assert after["domain"]["loss"] == pytest.approx(evaluate_blocks(adapted, corpus.eval).loss, rel=1e-5)
    general_after = evaluate_texts(adapted, ext.tokenizer, TEXTS[:2])
    assert after["general"]["loss"] == pytest.approx(general_after.loss, rel=1e-5)
    # per token the sides count different tokens; bits per byte is over the same bytes
    assert before["domain"]["tokens"] > after["domain"]["tokens"]
    assert before["domain"]["bytes"] == after["domain"]["bytes"] == sum(corpus.eval["bytes"])
    assert result.forgetting["domain"]["bpb_before"] == pytest.approx(domain.bits_per_byte)


def test_checkpoints_hold_the_new_rows_only_and_resume_reproduces_the_run(
    tiny_model_dir, extension, tmp_path
):
    tok, ext, cfg = extension
    corpus = prepare_corpus([TEXTS], ext.tokenizer, cfg)
    off = EvalConfig(enabled=False)
    full, _ = _token_run(tiny_model_dir, ext.tokenizer, corpus, tmp_path / "full", eval_config=off)
    _, part = _token_run(
        tiny_model_dir, ext.tokenizer, corpus, tmp_path / "part", eval_config=off, stop_at=4, save_every=2
    )
    assert part.steps == 4
    ckpt = (
        tmp_path / "part" / "checkpoints"
        if (tmp_path / "part" / "checkpoints").is_dir()
        else tmp_path / "part"
    )
    saved = sorted(ckpt.glob("checkpoint-*/adapter_model.safetensors"))
    assert saved, "no checkpoint written"
    with safe_open(str(saved[-1]), "pt") as f:
        rows = {k: f.get_slice(k).get_shape() for k in f.keys() if "lora_" not in k}  # noqa: SIM118
    assert sorted(rows) == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
    ]
    assert all(shape == [len(ext.new_tokens), 64] for shape in rows.values())
    resumed, res = _token_run(
        tiny_model_dir,
        ext.tokenizer,
        corpus,
        tmp_path / "part",
        eval_config=off,
        resume="latest",
        save_every=2,
    )
    assert res.steps == 6
    a = {n: p.detach() for n, p in full.named_parameters() if p.requires_grad}
    b = {n: p.detach() for n, p in resumed.named_parameters() if p.requires_grad}
    assert sorted(a) == sorted(b) and any("trainable_tokens_delta" in n for n in a)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)
