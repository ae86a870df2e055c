"""Checkpoints nobody can silently corrupt: rotation only after the marker, every file validated before a
resume chooses a checkpoint, a run killed anywhere resumes to the uninterrupted run's adapter.

The expensive part, an uninterrupted run that keeps a checkpoint of every step, is trained once (module
fixture); each case copies its last two checkpoints, damages the newer one, and resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_dapt.checkpoints import COMPLETE_MARKER, checkpoint_problem, write_marker
from lora_dapt.errors import TrainingError
from lora_dapt.rundir import RunDir

from .reliability_worker import CRASH_CODE, MAX_STEPS, finish, start_worker, train, train_rows

LAST = MAX_STEPS - 1
"""The damaged checkpoint; the resume must go on from LAST - 1."""


@dataclass
class Reference:
    run: Path
    """An uninterrupted run with a checkpoint at every step."""
    adapter: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(tiny_model_dir, out, save_every=1, save_total_limit=MAX_STEPS)
    assert result.steps == MAX_STEPS
    return Reference(out, load_file(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(out: Path, reference: Reference) -> None:
    """``out`` ended with the uninterrupted run's adapter and logged every step exactly once."""
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert got.keys() == reference.adapter.keys()
    for k, want in reference.adapter.items():
        assert torch.allclose(got[k], want, atol=1e-5), k
    assert [r["step"] for r in train_rows(out)] == list(range(1, MAX_STEPS + 1))


def interrupted_copy(reference: Reference, dst: Path) -> Path:
    """The reference run as a kill after step MAX_STEPS left it: checkpoints LAST - 1 and LAST, the whole
    metrics log, no adapter or summary."""
    ref = RunDir(reference.run)
    run = RunDir(dst).create()
    for step in (LAST - 1, LAST):
        shutil.copytree(ref.checkpoint_dir(step), run.checkpoint_dir(step))
    for name in ("config.yaml", "run_info.json", "metrics.jsonl"):
        shutil.copy(ref.path / name, run.path / name)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Ways to damage a file
# ---------------------------------------------------------------------------------------------------------------


class Payload:
    """Pickles to a call of ``os.mkdir(path)``: loading it with a plain unpickler creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def damage(path: Path, how: str, evidence: Path) -> None:
    """Damage ``path``: 'truncated' (first half), 'garbled' (same size, every byte changed), 'pickle' (a
    torch.save'd payload that would create ``evidence``), 'deleted', 'empty-json' (``{}``), 'bitflip' (one
    exponent bit of the last tensor value)."""
    data = path.read_bytes() if path.exists() else b""
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbled":
        path.write_bytes(bytes(b ^ 0x5A for b in data))
    elif how == "pickle":  # padded if need be: a payload of the file's own size is a checksum case
        torch.save({"state": Payload(evidence)}, path)
        if path.stat().st_size == len(data):
            torch.save({"state": Payload(evidence), "pad": b"." * 4096}, path)
    elif how == "deleted":
        path.unlink()
    elif how == "empty-json":
        path.write_text("{}", encoding="utf-8")
    elif how == "bitflip":  # little-endian fp32: byte 3 of a value holds the sign and 7 exponent bits
        flipped = bytearray(data)
        flipped[-1] ^= 0x40
        path.write_bytes(bytes(flipped))
    else:
        raise ValueError(how)


WEIGHTS, MARKER = "adapter_model.safetensors", COMPLETE_MARKER
FILES = [WEIGHTS, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]
CHECKSUM = "checksum differs from the one recorded when it was saved (corrupt)"
UNPICKLING = "cannot be loaded safely (UnpicklingError: Weights only load failed"
CASES = [  # (file, damage, the reason the skip names); "X is " continues "N bytes, M when saved (truncated..."
    *[(f, "truncated", f"{f} is ") for f in FILES],
    *[(f, "garbled", f"{f} {CHECKSUM}") for f in FILES],
    *[(f, "pickle", f"{f} is ") for f in FILES],
    *[(f, "deleted", f"{f} missing (listed in {MARKER})") for f in FILES],
    (MARKER, "truncated", f"{MARKER} unreadable (JSONDecodeError"),
    (MARKER, "garbled", f"{MARKER} unreadable ("),
    (MARKER, "pickle", f"{MARKER} unreadable ("),
    (MARKER, "deleted", f"no completion marker ({MARKER} missing: the save was interrupted)"),
    ("trainer_state.json", "empty-json", "trainer_state.json is 2 bytes,"),
    (WEIGHTS, "bitflip", f"{WEIGHTS} checksum differs"),
]


@pytest.mark.parametrize(("name", "how", "reason"), CASES, ids=[f"{n}-{h}" for n, h, _ in CASES])
def test_a_damaged_checkpoint_is_skipped_and_the_run_ends_as_if_uninterrupted(
    name, how, reason, reference, tiny_model_dir, tmp_path, caplog
):
    run = RunDir(interrupted_copy(reference, tmp_path / "run"))
    damage(run.checkpoint_dir(LAST) / name, how, tmp_path / "payload-ran")
    with caplog.at_level("INFO", logger="lora_dapt"):
        result = train(tiny_model_dir, run.path, "latest", save_every=1)
    assert f"skipping checkpoint {run.checkpoint_dir(LAST)}: {reason}" in caplog.text
    assert f"resuming from {run.checkpoint_dir(LAST - 1)} (step {LAST - 1})" in caplog.text
    assert result.steps == MAX_STEPS
    assert_same_adapter(run.path, reference)
    assert not (tmp_path / "payload-ran").exists()


# Damage a checksum cannot see: the marker is written again after the damage (a buggy save, or a hand that
# rewrote it), so the content checks must catch it.
RESEALED = [
    ("optimizer.pt", "pickle", f"optimizer.pt {UNPICKLING}"),
    ("scheduler.pt", "pickle", f"scheduler.pt {UNPICKLING}"),
    ("rng_state.pth", "pickle", f"rng_state.pth {UNPICKLING}"),
    ("optimizer.pt", "truncated", "optimizer.pt cannot be loaded safely ("),
    ("rng_state.pth", "truncated", "rng_state.pth cannot be loaded safely ("),
    ("trainer_state.json", "empty-json", "trainer_state.json has no global_step (found 'None')"),
    (WEIGHTS, "truncated", f"{WEIGHTS} corrupt ("),
    ("adapter_model.bin", "pickle", "adapter_model.bin is a pickle (loading it could run code)"),
]


@pytest.mark.parametrize(("name", "how", "reason"), RESEALED, ids=[f"{n}-{h}" for n, h, _ in RESEALED])
def test_damage_behind_a_rewritten_marker_is_caught_by_loading_it_safely(
    name, how, reason, reference, tiny_model_dir, tmp_path, caplog
):
    run = RunDir(interrupted_copy(reference, tmp_path / "run"))
    ckpt = run.checkpoint_dir(LAST)
    damage(ckpt / name, how, tmp_path / "payload-ran")
    write_marker(ckpt, LAST, json.loads((ckpt / MARKER).read_text())["tokens"])
    with caplog.at_level("INFO", logger="lora_dapt"):
        train(tiny_model_dir, run.path, "latest", save_every=1)
    assert f"skipping checkpoint {ckpt}: {reason}" in caplog.text
    assert f"resuming from {run.checkpoint_dir(LAST - 1)} (step {LAST - 1})" in caplog.text
    assert_same_adapter(run.path, reference)
    assert not (tmp_path / "payload-ran").exists()


def test_the_pickle_payload_is_live(tmp_path):
    """The payload of the cases above does run under a plain unpickler: its absence there means something."""
    damage(tmp_path / "x.pt", "pickle", tmp_path / "ran")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "ran").is_dir()


def test_a_checkpoint_from_before_checksums_gets_the_other_checks(reference, tmp_path, caplog):
    run = RunDir(interrupted_copy(reference, tmp_path / "run"))
    ckpt = run.checkpoint_dir(LAST)
    (ckpt / MARKER).write_text(json.dumps({"step": LAST, "tokens": 0}))  # the old marker: no file list
    with caplog.at_level("INFO", logger="lora_dapt"):
        assert checkpoint_problem(ckpt) is None
    assert (
        f"{ckpt} was saved without checksums (an older lora_dapt): its files are not verified" in caplog.text
    )
    damage(ckpt / "optimizer.pt", "garbled", tmp_path / "unused")
    assert checkpoint_problem(ckpt).startswith("optimizer.pt cannot be loaded safely (")
    damage(ckpt / "optimizer.pt", "deleted", tmp_path / "unused")
    assert checkpoint_problem(ckpt) == "optimizer.pt missing"


def test_no_usable_checkpoint_in_a_run_is_refused_and_nothing_is_deleted(reference, tiny_model_dir, tmp_path):
    run = RunDir(interrupted_copy(reference, tmp_path / "run"))
    damage(run.checkpoint_dir(LAST) / "optimizer.pt", "truncated", tmp_path / "unused")
    (run.checkpoint_dir(LAST - 1) / MARKER).unlink()
    before = {p.relative_to(run.path): p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError) as err:
        train(tiny_model_dir, run.path, "latest", save_every=1)
    msg = str(err.value)
    assert f"train.resume_from='latest' found no usable checkpoint in {run.path}" in msg
    assert f"2 checkpoint(s): checkpoint-{LAST}, checkpoint-{LAST - 1}" in msg
    assert f"metrics.jsonl with {MAX_STEPS} train row(s) up to step {MAX_STEPS}" in msg
    assert "nothing was deleted" in msg
    assert (
        f"checkpoint-{LAST}: optimizer.pt is " in msg
        and f"checkpoint-{LAST - 1}: no completion marker" in msg
    )
    assert "train.resume_from=PATH" in msg and "train.overwrite=true" in msg
    after = {p.relative_to(run.path): p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    assert after.keys() - {Path("lora_dapt.lock")} == before.keys()
    assert all(after[k] == v for k, v in before.items())


# ---------------------------------------------------------------------------------------------------------------
# Rotation after the marker: a kill between the Trainer's save and the marker
# ---------------------------------------------------------------------------------------------------------------


def test_a_kill_between_the_trainers_save_and_the_marker_loses_nothing(reference, tiny_model_dir, tmp_path):
    """save_total_limit=1: if the Trainer rotated inside its save, checkpoint-4 would be gone when the
    process dies before checkpoint-6's marker, and the resume would find nothing."""
    out = tmp_path / "run"
    run = RunDir(out)
    code, _, stderr = finish(
        start_worker(tiny_model_dir, out, "", "--crash-before-marker", "6", "--save-total-limit", "1")
    )
    assert code == CRASH_CODE, stderr[-3000:]
    assert [p.name for p in run.checkpoints()] == ["checkpoint-6", "checkpoint-4"]
    assert (run.checkpoint_dir(4) / MARKER).is_file() and not (run.checkpoint_dir(6) / MARKER).exists()
    assert [r["step"] for r in train_rows(out)] == list(range(1, 7))

    code, stdout, stderr = finish(start_worker(tiny_model_dir, out, "latest", "--save-total-limit", "1"))
    assert code == 0, stderr[-3000:]
    assert f"skipping checkpoint {run.checkpoint_dir(6)}: no completion marker" in stderr
    assert f"resuming from {run.checkpoint_dir(4)} (step 4)" in stderr
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == MAX_STEPS
    assert_same_adapter(out, reference)
    # the newest complete checkpoint, and the one this session resumed from (rotation never deletes it)
    assert [p.name for p in run.checkpoints()] == [f"checkpoint-{MAX_STEPS}", "checkpoint-4"]


def test_rotation_keeps_the_newest_complete_checkpoints(reference, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_model_dir, out, save_every=1, save_total_limit=2)
    run = RunDir(out)
    assert [p.name for p in run.checkpoints()] == [f"checkpoint-{MAX_STEPS}", f"checkpoint-{MAX_STEPS - 1}"]
    assert all(checkpoint_problem(p) is None for p in run.checkpoints())
    assert_same_adapter(out, reference)
