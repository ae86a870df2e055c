"""GGUF export: round trips of tiny merged models through the file and transformers' GGUF reader.

Tolerances: the weights read back equal the merged weights rounded to the file's type exactly (f16, bf16:
this is what proves the rotary permutation of Q/K is undone exactly); logits agree within the bound the
export states, 16 * u * max(1, max |logit|) with u = 2^-11 (f16), 2^-8 (bf16), 1/127 (q8_0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_dapt.errors import ExportError
from lora_dapt.export import gguf as gguf_export
from lora_dapt.export.gguf import export_gguf

from .conftest import build_model, build_tokenizer, make_text

TEXTS = [make_text(50, seed=500 + i) for i in range(3)]


def _merged(
    tmp: Path, *, tie: bool = False, added: list[str] | None = None, template: str | None = None
) -> Path:
    """A 'merged' model directory: the tiny Llama saved with plain transformers (optionally with added
    tokens and resized embeddings)."""
    tok = build_tokenizer(tmp)
    model = build_model(tmp, len(tok), tie=tie)
    if added or template:
        if added:
            tok.add_tokens(added)
            model.resize_token_embeddings(len(tok))
        if template:
            tok.chat_template = template
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
    return tmp


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    d = _merged(tmp_path_factory.mktemp("merged_untied"))
    return d, export_gguf(d, d.parent / "untied-f16.gguf", eval_texts=TEXTS)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    d = _merged(tmp_path_factory.mktemp("merged_tied"), tie=True)
    return d, export_gguf(d, d.parent / "tied-f16.gguf", eval_texts=TEXTS)


def _reload(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def _merged_model(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _tensor_names(path: Path) -> list[str]:
    from gguf import GGUFReader

    return [t.name for t in GGUFReader(path).tensors]


def _assert_weights_exact(merged, reloaded, dtype: torch.dtype) -> None:
    ref = merged.state_dict()
    got = reloaded.state_dict()
    for name, w in ref.items():
        expected = w.to(dtype).float() if w.dim() > 1 else w
        assert torch.equal(got[name], expected), name


def _assert_logits_close(merged, reloaded, tokenizer, type: str) -> None:
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(ids).logits, reloaded(ids).logits
    atol = 16 * gguf_export.ROUNDING[type] * max(1.0, float(a.abs().max()))
    assert torch.allclose(a, b, rtol=0, atol=atol), float((a - b).abs().max())


def test_f16_untied_round_trip(untied):
    d, result = untied
    from transformers import AutoTokenizer

    assert result.path.is_file() and not result.path.with_name(result.path.name + ".partial").exists()
    assert result.report["passed"] is True and result.report["tokenizer_mismatches"] == 0
    assert result.report["written"]["tensors"] == {"f32": 5, "f16": 16}
    assert "output.weight" in _tensor_names(result.path)
    merged, reloaded = _merged_model(d), _reload(result.path)
    assert reloaded.config.tie_word_embeddings is False
    _assert_weights_exact(merged, reloaded, torch.float16)  # q/k permutation undone exactly
    _assert_logits_close(merged, reloaded, AutoTokenizer.from_pretrained(d), "f16")
    saved = json.loads(result.path.with_name(result.path.name + ".export_report.json").read_text())
    assert saved["passed"] is True and saved["max_abs_logit_diff"] == result.report["max_abs_logit_diff"]
    assert saved["bound"]["rounding_u"] == 2**-11 and saved["max_abs_logit_diff"] <= saved["bound"]["logit"]


def test_rope_permute_is_undone_by_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of head_dim 4
    permuted = gguf_export.rope_permute(w, 2)
    assert permuted[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # per head [a0, b0, a1, b1]
    back = LlamaTensorProcessor(
        {"num_attention_heads": 2, "num_key_value_heads": 2}
    )._reverse_permute_weights(permuted.numpy(), 2, 2)
    assert torch.equal(torch.from_numpy(back), w)


def test_f16_tied_has_no_output_tensor(tied):
    d, result = tied
    from transformers import AutoTokenizer

    assert "output.weight" not in _tensor_names(result.path)
    assert result.report["written"]["tied_head"] is True and result.report["passed"] is True
    merged, reloaded = _merged_model(d), _reload(result.path)
    assert reloaded.config.tie_word_embeddings is True
    _assert_weights_exact(merged, reloaded, torch.float16)
    _assert_logits_close(merged, reloaded, AutoTokenizer.from_pretrained(d), "f16")


def test_added_tokens_and_extended_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    d = _merged(tmp_path / "m", added=["renalclearance", "<dapt>"])
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 322
    result = export_gguf(d, tmp_path / "ext.gguf", eval_texts=[t + " renalclearance <dapt> x" for t in TEXTS])
    assert result.report["written"]["vocab_size"] == 322 and result.report["tokenizer_mismatches"] == 0
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="ext.gguf")
    text = "the renalclearance of <dapt> dose"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert tok.convert_tokens_to_ids("<dapt>") == 321 and 321 in tok(text)["input_ids"]
    merged, reloaded = _merged_model(d), _reload(result.path)
    assert reloaded.get_input_embeddings().weight.shape == (322, 64)
    _assert_weights_exact(merged, reloaded, torch.float16)


def test_q8_0_within_its_bound(untied, tmp_path):
    d, f16 = untied
    result = export_gguf(d, tmp_path / "q8.gguf", type="q8_0", eval_texts=TEXTS)
    r = result.report
    assert r["passed"] is True and r["bound"]["rounding_u"] == pytest.approx(1 / 127)
    assert 0 < r["max_abs_logit_diff"] <= r["bound"]["logit"]
    assert r["loss_diff"] <= r["bound"]["loss"]
    assert r["written"]["tensors"] == {"f32": 5, "q8_0": 16} and r["written"]["kept_f16_for_q8_0"] == []
    assert result.size_bytes < 0.6 * f16.size_bytes  # 8.5 bits per weight instead of 16


def test_bf16_round_trip(untied, tmp_path):
    d, _ = untied
    result = export_gguf(d, tmp_path / "b.gguf", type="bf16", eval_texts=TEXTS)
    assert result.report["passed"] is True and result.type == "bf16"
    _assert_weights_exact(_merged_model(d), _reload(result.path), torch.bfloat16)


def test_qwen2_round_trip(tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    d = tmp_path / "qwen"
    tok = build_tokenizer(d)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero q/k/v biases, so a lost bias shows
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    model.save_pretrained(d)
    result = export_gguf(d, tmp_path / "q.gguf", eval_texts=TEXTS)
    assert result.report["written"]["architecture"] == "qwen2" and result.report["passed"] is True
    assert "blk.0.attn_q.bias" in _tensor_names(result.path)
    reloaded = _reload(result.path)
    _assert_weights_exact(_merged_model(d), reloaded, torch.float16)
    _assert_logits_close(_merged_model(d), reloaded, AutoTokenizer.from_pretrained(d), "f16")


def test_modelfile(tmp_path, untied):
    _, result = untied
    text = result.modelfile.read_text()
    assert result.modelfile == result.path.with_suffix(".Modelfile")
    assert "FROM ./untied-f16.gguf\n" in text and 'PARAMETER stop "</s>"' in text
    assert "TEMPLATE" not in text.replace("# No chat template", "")
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    d = _merged(tmp_path / "chat", added=["<|im_start|>", "<|im_end|>"], template=chatml)
    chat = export_gguf(d, tmp_path / "chat.gguf", eval_texts=TEXTS)
    text = chat.modelfile.read_text()
    assert (
        'TEMPLATE """' in text and "<|im_start|>assistant" in text and 'PARAMETER stop "<|im_end|>"' in text
    )
    from gguf import GGUFReader

    field = GGUFReader(chat.path).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == chatml


def test_failed_check_leaves_partial(untied, tmp_path, monkeypatch):
    d, _ = untied
    monkeypatch.setitem(gguf_export.ROUNDING, "f16", 1e-12)  # a bound nothing meets
    path = tmp_path / "strict.gguf"
    with pytest.raises(ExportError, match="did not verify.*max \\|logit diff\\|.*exceeds the f16 bound"):
        export_gguf(d, path, eval_texts=TEXTS)
    assert not path.exists() and (tmp_path / "strict.gguf.partial").is_file()
    assert json.loads((tmp_path / "strict.gguf.export_report.json").read_text())["passed"] is False


def test_existing_output_refused_without_overwrite(untied):
    d, result = untied
    with pytest.raises(ExportError, match="already exists: pass overwrite=True"):
        export_gguf(d, result.path, eval_texts=TEXTS)


def test_unsupported_architecture_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer(tmp_path)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match="model type 'gpt2'; supported: llama, mistral, qwen2"):
        export_gguf(tmp_path, tmp_path.parent / "gpt2.gguf")
    assert not (tmp_path.parent / "gpt2.gguf.partial").exists()


def test_run_without_merged_refused(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match=f"run `lora-dapt merge {tmp_path}` first"):
        export_gguf(tmp_path)


def test_run_directory_default_output_and_eval_texts(tmp_path):
    from lora_dapt.rundir import RunDir

    run = tmp_path / "demo"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    _merged(run / "merged", tie=True)
    RunDir(run).write_eval_texts(TEXTS[:2])
    result = export_gguf(run, type="q8_0")
    assert result.path == run / "demo-q8_0.gguf" and result.path.is_file()
    assert result.report["eval_texts"] == "the run's eval split (eval_texts.json)"


def test_cli_export(untied, tmp_path, capsys):
    from lora_dapt.cli.main import main

    d, _ = untied
    out = tmp_path / "cli.gguf"
    assert main(["export", str(d), "--format", "gguf", "--type", "f16", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"GGUF written: {out} (f16" in printed and "passed" in printed and out.is_file()
    assert main(["export", str(d), "--output", str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


def _sentencepiece_bpe_tokenizer(out_dir: Path):
    """A tiny Mistral / Llama 2 style tokenizer: BPE with byte fallback, a Metaspace ("▁") pre-tokenizer
    and decoder, ids 0-2 ``<unk>``, ``<s>``, ``</s>``, then the 256 ``<0xNN>`` byte pieces, then the learned
    pieces. Trained on ASCII text, so any other character is spelled with byte pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=[], show_progress=False)
    trainer_tok.train_from_iterator([make_text(200, s) for s in range(30)], trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += sorted((t for t in learned["vocab"] if t not in pieces), key=learned["vocab"].get)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(pieces)}, merges=merges, unk_token="<unk>", byte_fallback=True,
            fuse_unk=True,
        )
    )  # fmt: skip
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def test_sentencepiece_bpe_mistral_round_trip(tmp_path):
    """The "llama" tokenizer kind (Llama 2 / Mistral): ``▁`` pieces, byte fallback, scores; on a Mistral."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    d = tmp_path / "mistral"
    tok = _sentencepiece_bpe_tokenizer(d)
    texts = TEXTS + ["naïve café ☃ déjà vu", "  two spaces, a tab\tand\nnew line", "ÅÄÖ 日本語 emoji 🙂 end"]
    for text in texts[3:]:  # the non-ASCII characters really go through the byte pieces
        assert any(3 <= i < 259 for i in tok(text)["input_ids"]), text
    assert (
        tok("naïve")["input_ids"][0] == tok.bos_token_id
        and len(tok) == tok.backend_tokenizer.get_vocab_size()
    )
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2, sliding_window=None, initializer_range=0.2,
    )  # fmt: skip
    MistralForCausalLM(cfg).save_pretrained(d)
    result = export_gguf(d, tmp_path / "mistral-f16.gguf", type="f16", eval_texts=texts)
    assert result.report["passed"] is True and result.report["tokenizer_mismatches"] == 0
    assert result.report["written"]["architecture"] == "llama"
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="mistral-f16.gguf")
    for text in texts:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
        ids = tok(text)["input_ids"]
        assert back.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert back.decode(back(texts[3])["input_ids"], skip_special_tokens=True) == texts[3]  # bytes fused back
    from gguf import GGUFReader

    fields = GGUFReader(result.path).fields
    token_type = fields["tokenizer.ggml.token_type"]
    types = [int(token_type.parts[i][0]) for i in token_type.data]
    assert types[:4] == [2, 3, 3, 6] and types[258] == 6 and types[259] == 1  # UNKNOWN, CONTROL, BYTE, NORMAL
    assert str(bytes(fields["tokenizer.ggml.model"].parts[-1]), "utf-8") == "llama"
    merged, reloaded = _merged_model(d), _reload(result.path)
    _assert_weights_exact(merged, reloaded, torch.float16)
    ids = tok(texts[3], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(ids).logits, reloaded(ids).logits
    atol = 16 * gguf_export.ROUNDING["f16"] * max(1.0, float(a.abs().max()))
    assert torch.allclose(a, b, rtol=0, atol=atol), float((a - b).abs().max())
    _assert_logits_close(merged, reloaded, tok, "f16")


def test_domain_tokens_survive_merge_and_verified_export(tmp_path):
    """Domain tokens spelled with a leading space (what extend_vocabulary adds) are USER_DEFINED in the file;
    transformers' GGUF reader drops them, and export_gguf's check puts them back at their ids (one of them,
    ' dose', is also a normal token of the base, spelled 'Ġdose': the reader's collision is repaired too)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    import lora_dapt as ld
    from lora_dapt.export.gguf_vocab import USER_DEFINED, gguf_tokens, with_user_defined
    from lora_dapt.model.load import load_base_model
    from lora_dapt.model.lora import apply_lora
    from lora_dapt.model.vocab import add_token_rows

    base = tmp_path / "base"
    build_model(base, len(build_tokenizer(base)))
    model, old = load_base_model(base, quantization=None, compute_dtype="float32")
    new = [" plaintiff", " liability", " dose"]
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])
    rows = add_token_rows(model, old, tok)
    start = model.get_input_embeddings().weight[320:323].detach().clone()
    torch.manual_seed(0)
    peft_model = apply_lora(
        model, ld.AdapterConfig(r=4, alpha=8, gradient_checkpointing=False), trainable_tokens=rows.token_ids
    )
    with torch.no_grad():  # 'trained' rows: the merge must carry them
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    tok.save_pretrained(tmp_path / "adapter")
    merged = ld.merge_adapter(
        str(base),
        tmp_path / "adapter",
        tmp_path / "merged",
        dtype="float32",
        trained_on=ld.ModelConfig(name_or_path=str(base), compute_dtype="float32"),
    )
    texts = [t + " the plaintiff of liability dose. dose" for t in TEXTS]
    result = export_gguf(merged, tmp_path / "dom.gguf", eval_texts=texts)
    assert result.report["passed"] and result.report["tokenizer_mismatches"] == 0
    tokens, kinds = gguf_tokens(result.path)
    assert tokens[320:323] == new and kinds[320:323] == [USER_DEFINED] * 3 and len(tokens) == 384
    assert tokens[tok.convert_tokens_to_ids("Ġdose")] == "Ġdose"
    # the repair is needed: transformers' own reload encodes the domain words differently
    plain = AutoTokenizer.from_pretrained(tmp_path, gguf_file="dom.gguf")
    ids = tok(texts[0])["input_ids"]
    assert {320, 321, 322} <= set(ids) and plain(texts[0])["input_ids"] != ids
    assert with_user_defined(plain, result.path)(texts[0])["input_ids"] == ids
    # the new rows in the file are the trained ones (f16 of the merged float32 rows)
    reader = GGUFReader(str(result.path))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    file_rows = torch.from_numpy(emb.data.astype("float32").reshape(384, 64)[320:323].copy())
    merged_model = _merged_model(merged)
    want = merged_model.get_input_embeddings().weight[320:323].detach()
    torch.testing.assert_close(file_rows, want, atol=2e-3, rtol=1e-3)
    delta = peft_model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    torch.testing.assert_close(want, delta.detach())  # the trained rows, not the initial ones
    assert (want - start).abs().min(dim=1).values.gt(0).all()
