"""The model subpackage on the tiny offline Llama: loading, LoRA, packed attention, the loss, CPU dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_dapt import AdapterConfig, ModelConfig
from lora_dapt.errors import ConfigError, ModelLoadError
from lora_dapt.model.load import ModelSource, fix_tokenizer, load_base_model, load_base_model_from
from lora_dapt.model.lora import apply_lora, count_parameters, tied_embeddings


def test_nf4_load_quantizes_linears_and_sets_pad(tiny_model_dir):
    loaded = load_base_model(tiny_model_dir, quantization="nf4")
    model, tok = loaded
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit"
    assert q.weight.quant_state.quant_type == "nf4"
    assert type(model.lm_head).__name__ == "Linear"  # the head stays 16/32-bit
    # the tokenizer had no pad token: one is chosen that is not EOS, so EOS stays learnable
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert loaded.source.quantization == "nf4"
    assert loaded.source.name_or_path == str(tiny_model_dir)
    assert loaded.source.pad_token not in (None, "eos")
    out = model(input_ids=torch.tensor([[0, 5, 6, 7]]))
    assert out.logits.shape == (1, 4, len(tok))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("quant,cls", [("fp4", "Linear4bit"), ("int8", "Linear8bitLt"), (None, "Linear")])
def test_other_quantizations(tiny_model_dir, quant, cls):
    model, _ = load_base_model(tiny_model_dir, quantization=quant)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == cls


def test_load_base_model_from_a_model_config_and_overrides(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quantization="fp4", compute_dtype="float32")
    loaded = load_base_model_from(cfg)
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.quant_type == "fp4"
    assert loaded.source.quantization == "fp4" and loaded.source.compute_dtype == "float32"
    assert loaded.source.name_or_path == str(tiny_model_dir)
    # an override replaces the config's value; the rest of the config still applies
    plain = load_base_model_from(cfg, quantization=None)
    assert type(plain.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert plain.source.quantization == "none" and plain.model.dtype == torch.float32
    none_cfg = cfg.replace(quantization="none", name_or_path="elsewhere/missing")
    assert not load_base_model_from(none_cfg, name_or_path=str(tiny_model_dir)).source.quantized


def test_model_source_of_a_foreign_model_reads_its_quantization(tiny_model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_dapt.model.bnb import describe_quantization

    qcfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=qcfg, device_map={"": "cpu"}
    )
    assert describe_quantization(model.config) == ("fp4", "float32")
    source = ModelSource.of_model(model)
    assert (source.quantization, source.compute_dtype) == ("fp4", "float32")
    assert source.name_or_path == str(tiny_model_dir)
    plain, _ = load_base_model(tiny_model_dir, quantization=None)
    assert describe_quantization(plain.config) == ("none", None)
    assert ModelSource.of_model(plain).quantization == "none"


def test_several_gguf_files_must_be_chosen(tmp_path):
    from lora_dapt.model.gguf import find_gguf

    (tmp_path / "a.gguf").write_bytes(b"")
    assert find_gguf(tmp_path) == (tmp_path, "a.gguf")
    assert find_gguf(tmp_path / "a.gguf") == (tmp_path, "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(
        ModelLoadError, match=r"several GGUF files \(a.gguf, b.gguf\); choose one with gguf_file="
    ):
        load_base_model(tmp_path)
    assert find_gguf(tmp_path, "b.gguf") == (tmp_path, "b.gguf")
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(tmp_path) is None  # a model directory: its GGUF files are not the model


def test_compute_dtype_auto_is_bf16_on_a_cpu_with_native_bf16_else_float32(tiny_model_dir):
    from lora_dapt.model.load import cpu_has_native_bf16

    model, _ = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype="auto")
    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == want


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found: .*nope.*config.json"):
        load_base_model(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json or .gguf file"):
        load_base_model(empty)


def test_pad_falls_back_to_eos_only_without_alternatives():
    from types import SimpleNamespace

    tok = SimpleNamespace(
        pad_token_id=None,
        pad_token=None,
        unk_token=None,
        unk_token_id=None,
        eos_token="</s>",
        eos_token_id=1,
        get_vocab=lambda: {"</s>": 1, "a": 2},
    )
    assert fix_tokenizer(tok) == "eos"
    assert tok.pad_token == "</s>"
    # a dedicated pad token in the vocabulary wins over eos
    tok = SimpleNamespace(**{**vars(tok), "pad_token": None, "get_vocab": lambda: {"</s>": 1, "<pad>": 5}})
    assert fix_tokenizer(tok) == "<pad>" and tok.pad_token == "<pad>"


def test_apply_lora_all_linear_trainable_only_lora(tiny_model_dir):
    model, _ = load_base_model(tiny_model_dir, quantization="nf4")
    model = apply_lora(model, AdapterConfig(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    n_train, n_total = count_parameters(model)
    # r=4 on 7 linears x 2 layers: A (r x in) + B (out x r)
    h, i, kv = 64, 128, 32
    per_layer = 4 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    assert n_train == 2 * per_layer
    assert n_total > n_train


def test_apply_lora_rslora_dora_and_explicit_targets(tiny_model_dir):
    model, _ = load_base_model(tiny_model_dir, quantization=None)
    model = apply_lora(
        model, AdapterConfig(r=4, alpha=8, use_rslora=True, use_dora=True, target_modules=["q_proj"])
    )
    cfg = model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora and cfg.target_modules == {"q_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_missing_target_names_available_modules(tiny_model_dir):
    model, _ = load_base_model(tiny_model_dir, quantization=None)
    with pytest.raises(
        ConfigError, match=r"query_key_value not found .* its linear layers are: down_proj, gate_proj"
    ):
        apply_lora(model, AdapterConfig(target_modules=["q_proj", "query_key_value"]))


def test_train_embeddings_keeps_tied_weights_tied(tiny_tied_model_dir):
    model, _ = load_base_model(tiny_tied_model_dir, quantization="nf4")
    assert tied_embeddings(model)
    model = apply_lora(model, AdapterConfig(r=4, train_embeddings=True))
    base = model.get_base_model()
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    # both wrapped modules train, and the trained copies are one tensor
    names = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert names
    w_emb = emb.modules_to_save["default"].weight
    w_head = head.modules_to_save["default"].weight
    assert w_emb.data_ptr() == w_head.data_ptr()


def test_train_embeddings_untied(tiny_model_dir):
    model, _ = load_base_model(tiny_model_dir, quantization="nf4")
    model = apply_lora(model, AdapterConfig(r=4, train_embeddings=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert any("embed_tokens" in n for n in names) and any("lm_head" in n for n in names)


def test_apply_lora_twice_refused(tiny_model_dir):
    model, _ = load_base_model(tiny_model_dir, quantization=None)
    model = apply_lora(model, AdapterConfig(r=2))
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        apply_lora(model, AdapterConfig(r=2))


def _lora_grad(model_dir, *, eval_before: str | None, loader: str = "lora_dapt") -> torch.Tensor:
    if loader == "lora_dapt":
        model, _ = load_base_model(model_dir, quantization="nf4")
    else:  # plain transformers, as a user might load it
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            dtype=torch.float32,
            device_map={"": "cpu"},
        )
    torch.manual_seed(1)
    x = torch.randint(3, 300, (2, 16))

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            m(input_ids=x)

    if eval_before == "base":
        evaluate(model)
    torch.manual_seed(0)
    model = apply_lora(model, AdapterConfig(r=4, dropout=0.0, init_lora_weights=False))
    if eval_before == "adapter":
        evaluate(model)
    from lora_dapt.model.bnb import keep_4bit_trainable

    keep_4bit_trainable(model)  # what continued_pretrain does first
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    return model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad


@pytest.mark.parametrize("when", ["base", "adapter"])
def test_evaluating_before_training_keeps_gradients_right(tiny_model_dir, when):
    # bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights on an eval forward into a layout whose kernel has
    # no backward; the gradient of the first layer's LoRA must be the same with or without that evaluation.
    reference = _lora_grad(tiny_model_dir, eval_before=None)
    assert reference.abs().max() > 0
    assert torch.allclose(_lora_grad(tiny_model_dir, eval_before=when), reference, atol=1e-6)


def test_foreign_repacked_model_is_refused_for_training(tiny_model_dir):
    import bitsandbytes as bnb

    from lora_dapt.errors import TrainingError

    if not bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")

    reference = _lora_grad(tiny_model_dir, eval_before=None, loader="transformers")
    assert reference.abs().max() > 0
    with pytest.raises(
        TrainingError, match="repacked by bitsandbytes .* Load the model again with lora_dapt"
    ):
        _lora_grad(tiny_model_dir, eval_before="base", loader="transformers")


# ---------------------------------------------------------------------------------------------------------------
# Packed-document attention (one causal SDPA call per document instead of a block-diagonal mask)
# ---------------------------------------------------------------------------------------------------------------


def _packed_positions(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in rows])


def _twin_models(model_dir, **load):
    """The same weights twice: transformers' sdpa (masked) and lora_dapt's default (per-document)."""
    ours, _ = load_base_model(model_dir, quantization=None, **load)
    theirs, _ = load_base_model(model_dir, quantization=None, attn_implementation="sdpa", **load)
    return ours, theirs


def test_default_attention_is_packed_sdpa_and_not_saved(tiny_model_dir, tmp_path):
    import json

    from lora_dapt.model.attention import PACKED_SDPA

    ours, theirs = _twin_models(tiny_model_dir)
    assert ours.config._attn_implementation == PACKED_SDPA
    assert theirs.config._attn_implementation == "sdpa"  # an explicit choice is kept
    ours.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert PACKED_SDPA not in json.dumps(saved)  # a saved model loads anywhere, without lora_dapt


def test_packed_sdpa_equals_masked_sdpa_forward_and_backward(tiny_model_dir, monkeypatch):
    import lora_dapt.model.attention as model_mod

    ours, theirs = _twin_models(tiny_model_dir, compute_dtype="float32")  # exact comparisons
    calls = []
    real = model_mod._packed_spans
    monkeypatch.setattr(model_mod, "_packed_spans", lambda *a: calls.append(r := real(*a)) or r)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 40))
    pos = _packed_positions([[9, 1, 17, 13], [40]])  # a 1-token document; a row with one document
    grads = []
    for m in (ours, theirs):
        m.train()
        # transformers builds the packing mask only without a KV cache; lora_dapt's attention splits anyway
        out = m(input_ids=ids, position_ids=pos, labels=ids, use_cache=m is ours)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        if m is ours:
            logits = out.logits.detach()
    ref = theirs(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(input_ids=ids, position_ids=pos, use_cache=False).logits, ref)
    leaky = theirs(input_ids=ids, position_ids=pos).logits  # with a cache, transformers' sdpa mixes documents
    assert not torch.allclose(leaky[0, 9:], ref[0, 9:], atol=1e-4)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)
    # the per-document path ran in every layer of both forwards (with and without a mask) and found the documents
    assert len(calls) == 2 * 2 and all(c == [[(0, 9), (9, 10), (10, 27), (27, 40)], [(0, 40)]] for c in calls)


def test_packed_sdpa_leaves_other_masks_to_transformers(tiny_model_dir, monkeypatch):
    import lora_dapt.model.attention as model_mod

    ours, theirs = _twin_models(tiny_model_dir)
    ours.eval(), theirs.eval()
    spans = []
    real = model_mod._packed_spans
    monkeypatch.setattr(model_mod, "_packed_spans", lambda *a: spans.append(r := real(*a)) or r)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 24))
    pad = torch.ones(2, 24, dtype=torch.long)
    pad[1, :5] = 0  # left padding: a padding mask, not a packing mask
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=pad, position_ids=pos).logits
        b = theirs(input_ids=ids, attention_mask=pad, position_ids=pos).logits
        torch.testing.assert_close(a[pad.bool()], b[pad.bool()], atol=1e-5, rtol=1e-5)
        assert spans and all(s is None for s in spans)  # looked, saw a mask it does not own, fell back
        plain = ours(input_ids=ids).logits  # no packing: the plain causal kernel
        torch.testing.assert_close(plain, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        # generation with a KV cache runs through transformers' path too
        tok_out = ours.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
        ref_out = theirs.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
        assert torch.equal(tok_out, ref_out)


def test_packed_sdpa_keeps_a_sliding_window(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from lora_dapt.model.attention import use_packed_sdpa

    cfg = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = MistralForCausalLM(MistralConfig(**cfg)).eval()
    ours = MistralForCausalLM(MistralConfig(**cfg)).eval()
    ours.load_state_dict(theirs.state_dict())
    assert use_packed_sdpa(ours)
    ids = torch.randint(0, 64, (1, 20))
    pos = _packed_positions([[12, 8]])
    with torch.no_grad():
        # documents longer than the window: the mask is not plain block-causal, so transformers' mask is used
        torch.testing.assert_close(
            ours(input_ids=ids, position_ids=pos, use_cache=False).logits,
            theirs(input_ids=ids, position_ids=pos, use_cache=False).logits,
        )


def test_packed_spans_accept_only_the_exact_block_causal_mask():
    from lora_dapt.model.attention import _packed_spans

    pos = _packed_positions([[3, 2]])
    seg = torch.tensor([0, 0, 0, 1, 1])
    exact = ((seg[:, None] == seg[None, :]) & torch.ones(5, 5, dtype=torch.bool).tril())[None, None]
    assert _packed_spans(exact, pos, 1, 5) == [[(0, 3), (3, 5)]]
    assert _packed_spans(exact, pos, 2, 5) == [[(0, 3), (3, 5)]] * 2  # one mask broadcast over the batch
    assert _packed_spans(None, pos, 1, 5) == [[(0, 3), (3, 5)]]  # no mask (a KV cache): split here
    assert _packed_spans(None, torch.arange(5)[None], 1, 5) is None  # one document, no mask: nothing to split
    leak = exact.clone()
    leak[0, 0, 3, 1] = True  # one cross-document entry
    assert _packed_spans(leak, pos, 1, 5) is None
    moved = leak.clone()
    moved[0, 0, 4, 3] = False  # as many True entries as the exact mask, one of them outside the documents
    assert _packed_spans(moved, pos, 1, 5) is None
    assert _packed_spans(exact.float(), pos, 1, 5) is None  # an additive float mask is not a packing mask


def test_the_loss_finds_the_documents_once_per_forward(tiny_model_dir, monkeypatch):
    import lora_dapt.model.attention as attention
    from lora_dapt.model.loss import causal_lm_loss_sum

    model, _ = load_base_model(tiny_model_dir, quantization=None)
    model = apply_lora(model, AdapterConfig(r=2, gradient_checkpointing=True))  # layers are recomputed
    calls = []
    real = attention._packed_spans
    monkeypatch.setattr(attention, "_packed_spans", lambda *a: calls.append(r := real(*a)) or r)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 40))
    pos = _packed_positions([[9, 1, 17, 13], [40]])
    model.train()
    loss_sum, n = causal_lm_loss_sum(model, ids, ids, pos)
    loss_sum.backward()
    assert n == 2 * 39
    # 2 layers, each run forward and again in the backward pass: the documents were found once
    assert calls == [[[(0, 9), (9, 10), (10, 27), (27, 40)], [(0, 40)]]]
    calls.clear()
    model(input_ids=ids, position_ids=pos, use_cache=False)
    assert len(calls) == 2  # a forward of the user's own finds them again in each layer


# ---------------------------------------------------------------------------------------------------------------
# The loss under no_grad: what evaluation and the merge check score with
# ---------------------------------------------------------------------------------------------------------------


def _logits_nll(model, ids, labels, position_ids=None) -> torch.Tensor:
    """The reference: cross-entropy of the model's own logits over the labelled positions, summed."""
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(logits[keep], targets[keep], reduction="sum")


@pytest.mark.parametrize("kind", ["16-bit", "nf4", "peft-nf4", "peft-nf4-chunked", "peft-16-bit-packed"])
def test_loss_sum_under_no_grad_equals_cross_entropy_of_the_logits(tiny_model_dir, monkeypatch, kind):
    import lora_dapt.model.loss as loss_mod

    model, tok = load_base_model(tiny_model_dir, quantization=None if "16-bit" in kind else "nf4")
    if kind.startswith("peft"):
        torch.manual_seed(0)  # non-zero LoRA B and dropout: eval mode must switch the dropout off
        model = apply_lora(model, AdapterConfig(r=4, dropout=0.3, init_lora_weights=False))
    if kind.endswith("chunked"):
        monkeypatch.setattr(loss_mod, "LOSS_LOGITS_BUDGET", 0)
        monkeypatch.setattr(loss_mod, "loss_chunk_tokens", lambda vocab: 7)
    fused = []
    real = loss_mod._FrozenHeadCrossEntropy.apply
    monkeypatch.setattr(loss_mod._FrozenHeadCrossEntropy, "apply", lambda *a: fused.append(a[4]) or real(*a))
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 20))
    labels = ids.clone()
    ids[1, 13:] = tok.pad_token_id  # right padding, not scored
    labels[1, 13:] = -100
    labels[2, :6] = -100  # a masked prompt
    pos = _packed_positions([[20], [13, 7], [6, 14]]) if kind.endswith("packed") else None
    model.eval()
    with torch.no_grad():
        loss_sum, n = loss_mod.causal_lm_loss_sum(model, ids, labels, pos)
        ref = _logits_nll(model, ids, labels, pos)
    assert n == 19 + 12 + 14
    assert not loss_sum.requires_grad and loss_sum.dtype == torch.float32
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)
    # a trainable head (no adapter: every weight trains) takes autograd's path; a LoRA model's frozen head the fused one
    assert fused == ([] if not kind.startswith("peft") else [7 if kind.endswith("chunked") else n])


def test_loss_without_targets_is_a_zero_tensor(tiny_model_dir):
    from lora_dapt.model.loss import causal_lm_loss_sum

    model, _ = load_base_model(tiny_model_dir, quantization="nf4")
    ids = torch.randint(3, 300, (2, 8))
    nothing = torch.full_like(ids, -100)
    with torch.no_grad():
        loss_sum, n = causal_lm_loss_sum(model.eval(), ids, nothing)
    assert n == 0 and isinstance(loss_sum, torch.Tensor) and loss_sum.item() == 0.0
    model = apply_lora(model, AdapterConfig(r=2))
    loss_sum, n = causal_lm_loss_sum(model, ids, nothing)
    loss_sum.backward()  # connected to every trainable tensor, with a zero gradient
    lora = [p for p in model.parameters() if p.requires_grad]
    assert n == 0 and lora and all(p.grad is not None and not p.grad.any() for p in lora)


# ---------------------------------------------------------------------------------------------------------------
# CPU dropout for LoRA
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_dropout_keeps_the_distribution_and_the_seed():
    from lora_dapt.model.lora import CPUDropout

    drop = CPUDropout(0.1)
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    # kept with probability 0.9 (400k draws: 5 standard deviations is 0.0024), scaled by 1 / 0.9
    assert abs(kept.float().mean().item() - 0.9) < 0.0024
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.003  # the expectation is preserved
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.tensor(1 / 0.9))
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # torch.manual_seed reproduces the mask
    assert not torch.equal(drop(x), y)  # and the next call draws a new one
    # rows are not copies of each other (each element has its own 32 random bits)
    assert not torch.equal(kept[0], kept[1])
    drop.eval()
    assert torch.equal(drop(x), x)  # eval mode: the identity


def test_training_swaps_lora_dropout_on_cpu(tiny_model_dir):
    from lora_dapt.model.lora import CPUDropout, use_cpu_dropout

    model, _ = load_base_model(tiny_model_dir, quantization="nf4")
    model = apply_lora(model, AdapterConfig(r=4, dropout=0.1))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q.lora_dropout["default"]) is torch.nn.Dropout
    assert use_cpu_dropout(model) == 2 * 7  # every all-linear target of both layers
    assert type(q.lora_dropout["default"]) is CPUDropout and q.lora_dropout["default"].p == 0.1
    assert use_cpu_dropout(model) == 0  # idempotent
    model.train()
    x = torch.randint(3, 300, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    assert q.lora_B["default"].weight.grad.abs().max() > 0  # (lora_A gets none while B is zero)
