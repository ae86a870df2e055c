"""Crash safety for real: SIGKILL and SIGINT mid-run, corrupt checkpoints, NaN, OOM, disk, hostile files."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from lora_dapt import AdapterConfig, EvalConfig, TrainConfig
from lora_dapt.data.packing import pack_documents
from lora_dapt.errors import ModelLoadError, TrainingError
from lora_dapt.model.load import load_base_model
from lora_dapt.model.lora import apply_lora, load_adapter
from lora_dapt.rundir import COMPLETE_MARKER, find_resume_checkpoint
from lora_dapt.train.pretrain import continued_pretrain

from .conftest import make_text
from .reliability_worker import MAX_STEPS, finish, start_worker, train_rows, wait_rows

NO_EVAL = EvalConfig(enabled=False)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    code, stdout, stderr = finish(start_worker(tiny_model_dir, out))
    assert code == 0, stderr[-2000:]
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(out: Path, reference: dict[str, torch.Tensor]) -> None:
    """The run in ``out`` ended with the reference adapter, and logged every step exactly once."""
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.allclose(got[k], reference[k], atol=1e-5), k
    steps = [r["step"] for r in train_rows(out)]
    assert steps == list(range(1, MAX_STEPS + 1)), steps  # every step exactly once


def test_sigkill_at_random_points_then_resume(tiny_model_dir, tmp_path, reference):
    rng = random.Random(1234)
    out = tmp_path / "run"
    kills = 0
    for _ in range(3):
        proc = start_worker(tiny_model_dir, out, "latest")
        done = len(train_rows(out))
        # from the 3rd row on, checkpoint-2 is complete: a run killed before its first checkpoint holds
        # nothing to resume, and resume_from=latest refuses it (test_rundir covers that refusal)
        wait_rows(proc, out, rng.randint(max(3, min(done + 1, MAX_STEPS - 2)), MAX_STEPS - 2))
        time.sleep(rng.uniform(0, 0.4))  # land anywhere: mid-step, mid-save, mid-log
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        finish(proc, timeout=60)
    assert kills >= 2
    code, stdout, stderr = finish(start_worker(tiny_model_dir, out, "latest"))
    assert code == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == MAX_STEPS
    assert_same_adapter(out, reference)


def test_sigint_saves_checkpoint_and_resumes(tiny_model_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = start_worker(tiny_model_dir, out)
    wait_rows(proc, out, 5)
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["stopped"] == "interrupted by SIGINT"
    assert "Traceback" not in stderr
    assert "resume_from='latest'" in stderr
    ckpt = find_resume_checkpoint(out, "latest")
    assert ckpt is not None and ckpt.name == f"checkpoint-{result['steps']}"  # saved at the step it stopped
    code, stdout, stderr = finish(start_worker(tiny_model_dir, out, "latest"))
    assert code == 0, stderr[-3000:]
    assert_same_adapter(out, reference)


def _blocks(tok, n: int = 12) -> Dataset:
    docs = [
        [tok.bos_token_id, *tok(make_text(20, s), add_special_tokens=False).input_ids, tok.eos_token_id]
        for s in range(n)
    ]
    return Dataset.from_list(pack_documents(docs, 32, tok.pad_token_id))


def _model(model_dir):
    model, tok = load_base_model(model_dir, quantization="nf4")
    torch.manual_seed(0)
    return apply_lora(model, AdapterConfig(r=4, alpha=8, dropout=0.0)), tok


def test_corrupt_and_incomplete_checkpoints_are_skipped(tiny_model_dir, tmp_path, caplog):
    model, tok = _model(tiny_model_dir)
    cfg = TrainConfig(
        output_dir=str(tmp_path), max_steps=6, save_every=2, save_total_limit=3, gradient_accumulation_steps=1
    )
    continued_pretrain(model, tok, _blocks(tok), cfg, eval_config=NO_EVAL)
    ckpts = tmp_path / "checkpoints"
    assert find_resume_checkpoint(tmp_path, "latest") == ckpts / "checkpoint-6"
    # newest: weights cut in half (a crash while writing); next: no completion marker
    w = ckpts / "checkpoint-6" / "adapter_model.safetensors"
    full = w.stat().st_size
    w.write_bytes(w.read_bytes()[: full // 2])
    (ckpts / "checkpoint-4" / COMPLETE_MARKER).unlink()
    with caplog.at_level("WARNING", logger="lora_dapt"):
        assert find_resume_checkpoint(tmp_path, "latest") == ckpts / "checkpoint-2"
    assert f"checkpoint-6: adapter_model.safetensors is {full // 2} bytes, {full} when saved" in caplog.text
    assert "checkpoint-4: no completion marker (lora_dapt_complete.json missing" in caplog.text
    with pytest.raises(
        TrainingError, match="cannot resume from .*checkpoint-6: adapter_model.safetensors is"
    ):
        find_resume_checkpoint(tmp_path, str(ckpts / "checkpoint-6"))
    # resuming goes on from step 2 and reaches the end
    model, tok = _model(tiny_model_dir)
    result = continued_pretrain(
        model, tok, _blocks(tok), cfg.replace(resume_from="latest"), eval_config=NO_EVAL
    )
    assert result.steps == 6


class NaNAt:
    """Forward hook that turns the first layer's output into NaN on one forward call."""

    def __init__(self, call: int) -> None:
        self.call, self.n = call, 0

    def __call__(self, module, args, output):
        self.n += 1
        if self.n == self.call:
            return (
                (output[0] * float("nan"), *output[1:])
                if isinstance(output, tuple)
                else output * float("nan")
            )
        return output


def test_nan_stops_run_with_step_and_advice(tiny_model_dir, tmp_path):
    model, tok = _model(tiny_model_dir)
    model.get_base_model().model.layers[0].register_forward_hook(NaNAt(call=3))
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=6, save_every=1, gradient_accumulation_steps=1)
    with pytest.raises(TrainingError) as err:
        continued_pretrain(model, tok, _blocks(tok), cfg, eval_config=NO_EVAL)
    msg = str(err.value)
    assert "non-finite loss at step 3" in msg
    assert "checkpoint-2" in msg  # the last good checkpoint
    assert "learning rate too high" in msg and "fp16 overflow" in msg


def test_nan_skip_mode_skips_the_update(tiny_model_dir, tmp_path, caplog):
    model, tok = _model(tiny_model_dir)
    model.get_base_model().model.layers[0].register_forward_hook(NaNAt(call=3))
    cfg = TrainConfig(
        output_dir=str(tmp_path), max_steps=5, gradient_accumulation_steps=1, on_nonfinite="skip"
    )
    with caplog.at_level("WARNING", logger="lora_dapt"):
        result = continued_pretrain(model, tok, _blocks(tok), cfg, eval_config=NO_EVAL)
    assert result.steps == 5 and result.skipped_steps == 1
    assert "step 3: non-finite loss, update skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_huge_learning_rate_is_caught(tiny_model_dir, tmp_path):
    model, tok = _model(tiny_model_dir)
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=30,
        learning_rate=1e30,
        max_grad_norm=None,
        gradient_accumulation_steps=1,
        scheduler="constant",
    )
    # step 1's gradient is finite; its update (lr 1e30) makes step 2's forward overflow
    with pytest.raises(TrainingError, match=r"non-finite loss at step 2; .* Last good checkpoint: none"):
        continued_pretrain(model, tok, _blocks(tok), cfg, eval_config=NO_EVAL)


class OutOfMemoryAtFirstStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_becomes_advice(tiny_model_dir, tmp_path):
    model, tok = _model(tiny_model_dir)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, gradient_accumulation_steps=2)
    with pytest.raises(TrainingError) as err:
        continued_pretrain(
            model, tok, _blocks(tok), cfg, eval_config=NO_EVAL, callbacks=[OutOfMemoryAtFirstStep()]
        )
    msg = str(err.value)
    assert "seq_len=32, batch_size=4, gradient_accumulation_steps=2" in msg
    assert "lora-dapt plan" in msg and "Tried to allocate 2.00 GiB" in msg


def test_full_disk_is_refused_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    import lora_dapt.rundir as train_mod

    model, tok = _model(tiny_model_dir)
    monkeypatch.setattr(
        train_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 2**20)
    )
    with pytest.raises(TrainingError, match=r"not enough disk space .* 1 MiB free"):
        continued_pretrain(
            model, tok, _blocks(tok), TrainConfig(output_dir=str(tmp_path)), eval_config=NO_EVAL
        )


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_adapter_is_refused_never_executed(tiny_model_dir, tmp_path):
    model, _ = _model(tiny_model_dir)
    model.save_pretrained(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    _Evil.marker = tmp_path / "pwned"
    torch.save({"x": _Evil()}, tmp_path / "ad" / "adapter_model.bin")
    fresh, _ = load_base_model(tiny_model_dir, quantization="nf4")
    with pytest.raises(ModelLoadError, match="pickle .* can run code"):
        load_adapter(fresh, tmp_path / "ad")
    assert not _Evil.marker.exists()


def test_mismatched_adapter_names_both(tiny_model_dir, tmp_path):
    from .conftest import build_model, build_tokenizer

    other = tmp_path / "other"
    tok = build_tokenizer(other)
    build_model(other, len(tok) + 64)  # another vocabulary size, same layer names
    model, _ = load_base_model(other, quantization=None)
    model = apply_lora(model, AdapterConfig(r=4, train_embeddings=True))
    model.save_pretrained(tmp_path / "ad")
    fresh, _ = load_base_model(tiny_model_dir, quantization=None)
    with pytest.raises(
        ModelLoadError, match=r"trained for base .*other.* does not fit the model .*size mismatch"
    ):
        load_adapter(fresh, tmp_path / "ad")
