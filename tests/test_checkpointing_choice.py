"""adapter.gradient_checkpointing: 'auto' asks the memory model, explicit values are kept."""

from __future__ import annotations

import pytest

from lora_dapt import AdapterConfig, apply_lora, load_base_model
from lora_dapt.planning.checkpointing import HEADROOM, choose_gradient_checkpointing
from lora_dapt.planning.memory import estimate_memory


@pytest.fixture()
def base(tiny_model_dir):
    model, _tok = load_base_model(str(tiny_model_dir), quantization="nf4", compute_dtype="float32")
    return model


def _need(model, adapter: AdapterConfig, seq_len: int, batch: int) -> int:
    est = estimate_memory(
        model,
        "nf4",
        adapter,
        seq_len=seq_len,
        batch_size=batch,
        gradient_checkpointing=False,
        compute_dtype="float32",
        device="cpu",
    )
    return est.total - est.weights


def test_auto_turns_checkpointing_off_when_the_step_fits(base):
    adapter = AdapterConfig(r=8)
    need = _need(base, adapter, 128, 2)
    free = int(need / HEADROOM) + 1024  # just enough headroom
    choice = choose_gradient_checkpointing(base, adapter, seq_len=128, batch_size=2, free_bytes=free)
    assert choice.enabled is False
    assert "off (adapter.gradient_checkpointing=auto)" in choice.reason
    assert f"{need / 1024**3:.2f} GiB" in choice.reason


def test_auto_turns_it_on_when_memory_is_tight(base):
    adapter = AdapterConfig(r=8)
    need = _need(base, adapter, 128, 2)
    free = int(need / HEADROOM) - 1024  # just short of the headroom
    choice = choose_gradient_checkpointing(base, adapter, seq_len=128, batch_size=2, free_bytes=free)
    assert choice.enabled is True
    assert "on (adapter.gradient_checkpointing=auto)" in choice.reason


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_is_kept_whatever_the_memory(base, setting):
    adapter = AdapterConfig(r=8, gradient_checkpointing=setting)
    choice = choose_gradient_checkpointing(
        base, adapter, seq_len=128, free_bytes=1 if not setting else 1 << 50
    )
    assert choice.enabled is setting


def test_apply_lora_applies_the_choice(tiny_model_dir):
    model, _ = load_base_model(str(tiny_model_dir), quantization="nf4", compute_dtype="float32")
    peft_model = apply_lora(model, AdapterConfig(r=4), seq_len=64)  # a tiny step fits any machine
    assert peft_model.base_model.model.is_gradient_checkpointing is False
    model, _ = load_base_model(str(tiny_model_dir), quantization="nf4", compute_dtype="float32")
    peft_model = apply_lora(model, AdapterConfig(r=4, gradient_checkpointing=True), seq_len=64)
    assert peft_model.base_model.model.is_gradient_checkpointing is True


def test_auto_dtype_is_bf16_on_a_cpu_with_native_bf16(tiny_model_dir, monkeypatch):
    import torch

    from lora_dapt.model import load

    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: True)
    assert load.resolve_compute_dtype("auto", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: False)
    assert load.resolve_compute_dtype("auto", torch.device("cpu")) is torch.float32
    assert load.resolve_compute_dtype("float32", torch.device("cpu")) is torch.float32
