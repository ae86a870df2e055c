"""Per-GPU memory on several GPUs (lora_dapt.planning.sharding), checked by hand on a known toy shape, and
`lora-dapt plan --gpus N` (FSDP divides the sharded part, DDP divides nothing but multiplies the batch)."""

from __future__ import annotations

import pytest

from lora_dapt.cli.main import main
from lora_dapt.errors import ConfigError
from lora_dapt.planning.memory import CUDA_CONTEXT_BYTES, GiB, estimate_memory, plan
from lora_dapt.planning.shapes import ModelShape
from lora_dapt.planning.sharding import accumulation_for, per_gpu_estimate

LAYER = (("q_proj", 64, 64), ("k_proj", 64, 64), ("v_proj", 64, 64), ("o_proj", 64, 64))
LAYER += (("gate_proj", 64, 128), ("up_proj", 64, 128), ("down_proj", 128, 64))
TOY = ModelShape(
    name="toy",
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    head_dim=16,
    tie_embeddings=True,
    linears=LAYER * 4,
    embedding_params=64_000,  # 1000 x 64, tied head
    other_params=576,  # two norms of 64 per layer + the final norm
)


def _one_gpu():
    return estimate_memory(
        TOY, None, 4, seq_len=32, batch_size=1, optimizer="adamw", compute_dtype="bfloat16"
    )


def test_one_gpu_parts_of_the_toy_shape():
    """The inputs of the per-GPU arithmetic below, by hand (bf16 base, LoRA r=4 on every linear, AdamW)."""
    e = _one_gpu()
    # linears: 4 x 64x64 + 3 x 64x128 = 40,960 per layer, x 4 layers x 2 bytes = 327,680
    # + embeddings 64,000 x 2 = 128,000 + norms 576 x 2 = 1,152
    assert e.weights == 327_680 + 128_000 + 1_152 == 456_832
    # LoRA r=4: 4 x (64+64) x 4 + 4 x (64+128) x 2 + 4 x (128+64) = 4,352 per layer, x 4 = 17,408 fp32
    assert e.trainable_params == 17_408
    assert (e.adapter, e.gradients, e.optimizer) == (69_632, 69_632, 139_264)


def test_fsdp_per_gpu_by_hand():
    e = _one_gpu()
    f = per_gpu_estimate(e, TOY, 2, "fsdp")
    # root (embeddings) R = 128,000 whole + its shard R/2; layers S = 456,832 - 128,000 = 328,832:
    # S/2 = 164,416 own shard + 2 gathered layers 2 x S/4 = 164,416
    assert f.weights == 164_416 + 164_416 + 128_000 + 64_000 == 520_832
    assert f.adapter == 69_632 // 2 + 2 * (69_632 // 4) == 69_632  # shard + two gathered layers' LoRA
    assert f.gradients == 69_632 // 2 + 69_632 // 4 == 52_224  # shard + one layer before reduce-scatter
    assert f.optimizer == 139_264 // 2 == 69_632
    assert (f.activations, f.logits) == (e.activations, e.logits)  # each rank: its own micro-batch
    base = 520_832 + 69_632 + 52_224 + 69_632 + e.activations + e.logits
    assert f.overhead == CUDA_CONTEXT_BYTES + int(0.05 * base)
    assert f.settings["gpus"] == 2 and f.settings["strategy"] == "fsdp"
    # four GPUs: S/4 = 82,208 + 2 x 82,208 gathered + 128,000 + R/4 = 32,000
    assert per_gpu_estimate(e, TOY, 4, "fsdp").weights == 82_208 * 3 + 128_000 + 32_000 == 406_624


def test_ddp_divides_nothing_and_counts_the_gradient_buckets():
    e = _one_gpu()
    d = per_gpu_estimate(e, TOY, 2, "ddp")
    assert (d.weights, d.adapter, d.optimizer) == (456_832, 69_632, 139_264)
    assert d.gradients == 2 * 69_632  # parameters' .grad + the reducer's bucket copy
    assert per_gpu_estimate(e, TOY, 1, "fsdp") is e  # one GPU: unchanged


def test_sharding_arguments_are_checked():
    with pytest.raises(ConfigError, match=r"gpus = 0: must be an int >= 1"):
        per_gpu_estimate(_one_gpu(), TOY, 0, "fsdp")
    with pytest.raises(ConfigError, match=r"strategy = 'zero3': must be one of ddp, fsdp"):
        plan("llama-3-8b", "24GB", gpus=2, strategy="zero3")
    assert accumulation_for(32768, 2048, 1) == 16 and accumulation_for(32768, 2048, 4) == 4
    assert accumulation_for(1000, 2048, 2) == 1


def test_plan_fsdp_fits_a_16_bit_8b_that_one_gpu_cannot():
    one = plan("llama-3-8b", "12GB", quantization=None)
    ddp = plan("llama-3-8b", "12GB", quantization=None, gpus=2, strategy="ddp")
    fsdp = plan("llama-3-8b", "12GB", quantization=None, gpus=2, strategy="fsdp")
    assert not one.fits and not ddp.fits
    assert fsdp.fits and fsdp.estimate.total <= 12 * GiB
    # bf16: embeddings + untied head R = 2 x 128,256 x 4,096 x 2 bytes = 2,101,346,304 stay whole (+ R/2);
    # the 32 layers (+ norms) S = 16,060,522,496 - R = 13,959,176,192: S/2 + 2 x S/32
    assert one.estimate.weights == 16_060_522_496
    assert fsdp.estimate.weights == 6_979_588_096 + 872_448_512 + 2_101_346_304 + 1_050_673_152
    assert any(n.startswith("FSDP over 2 GPUs: base weights") for n in fsdp.notes)


def test_plan_ddp_global_batch_multiplies():
    one = plan("llama-3-8b", "24GB")
    four = plan("llama-3-8b", "24GB", gpus=4)
    assert (four.seq_len, four.micro_batch_size) == (one.seq_len, one.micro_batch_size)
    micro = one.seq_len * one.micro_batch_size
    assert one.gradient_accumulation_steps == 32768 // micro
    assert four.gradient_accumulation_steps == max(1, 32768 // (4 * micro))  # at least one micro-step
    acc = four.gradient_accumulation_steps
    assert four.notes[-1].startswith(
        f"gradient accumulation {acc}: {acc * 4 * micro:,} tokens per optimizer step (4 GPUs x {micro:,})"
    )


def test_plan_command_with_gpus(capsys):
    argv = ["plan", "llama-3-8b", "--gpu-memory", "12GB", "--quantization", "none"]
    assert main([*argv, "--gpus", "2", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "llama-3-8b: fits in 12.0 GiB per GPU on 2 GPUs (FSDP)"
    assert out.splitlines()[-1].startswith("launch: accelerate launch --config_file examples/fsdp_qlora")
    assert main([*argv, "--gpus", "2"]) == 1  # DDP: the whole 16-bit model on each 12 GB card
    assert main([*argv, "--gpus", "0"]) == 2
    assert "gpus = 0: must be an int >= 1" in capsys.readouterr().err
