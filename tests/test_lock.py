"""One run at a time per directory: RunDir.start takes an flock that a second process cannot get."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lora_dapt.checkpoints import LOCK_FILE
from lora_dapt.errors import TrainingError
from lora_dapt.rundir import RunDir

from .reliability_worker import MAX_STEPS, finish, start_worker, train_rows, wait_rows


def _locked_message(run: RunDir, pid: int) -> str:
    return (
        f"{run.path} is in use by another training run (PID {pid}, which holds the lock "
        f"{run.path / LOCK_FILE}). Wait for it to finish or stop it, or train into another train.output_dir"
    )


def test_a_second_process_is_refused_and_a_killed_holder_blocks_no_one(tiny_model_dir, tmp_path):
    out, release = tmp_path / "run", tmp_path / "release"
    run = RunDir(out)
    first = start_worker(tiny_model_dir, out, "", "--hold-at", "3", "--hold-file", str(release))
    try:
        wait_rows(first, out, 3, timeout=180)
        assert first.poll() is None, finish(first)[2][-3000:]
        code, _, stderr = finish(start_worker(tiny_model_dir, out, "latest"), timeout=180)
        assert code == 1
        assert _locked_message(run, first.pid) in stderr
        assert first.poll() is None  # the first run still holds the directory, and still waits at step 3
        assert [r["step"] for r in train_rows(out)] == [1, 2, 3]  # the second one wrote nothing
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        finish(first, timeout=60)
    assert (out / LOCK_FILE).read_text().strip() == str(first.pid)  # a stale file, naming a dead process

    code, stdout, stderr = finish(start_worker(tiny_model_dir, out, "latest"))
    assert code == 0, stderr[-3000:]
    assert f"resuming from {run.checkpoint_dir(2)} (step 2)" in stderr
    assert [r["step"] for r in train_rows(out)] == list(range(1, MAX_STEPS + 1))
    assert (out / LOCK_FILE).read_text() == ""  # released: it names no one


def test_the_lock_names_this_process_and_goes_with_close(tmp_path):
    first, second = RunDir(tmp_path), RunDir(tmp_path)
    assert first.start(None) is None
    assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(TrainingError) as err:
        second.start(None)  # flock locks belong to open files: a second one conflicts in one process too
    assert str(err.value) == _locked_message(first, os.getpid())
    first.close()
    first.close()  # a second close is a no-op
    assert (tmp_path / LOCK_FILE).read_text() == ""
    with second:
        assert second.start(None) is None
        assert second.start(None) is None  # the same RunDir may start again: it holds the lock already
    third = RunDir(tmp_path)
    assert third.start(None) is None  # left the block: released
    third.close()


def test_an_error_releases_the_lock(tmp_path):
    run = RunDir(tmp_path)
    run.create().append_metric({"type": "train", "step": 1})
    with pytest.raises(TrainingError, match="holds an earlier run"), run:
        run.start(None)  # refused (no overwrite): the lock must not outlive the refusal
    with RunDir(tmp_path) as fresh:
        assert fresh.start(None, overwrite=True) is None

    again = RunDir(tmp_path / "other")
    again.create().append_metric({"type": "train", "step": 1})
    with pytest.raises(TrainingError, match="holds an earlier run"):
        again.start(None)  # without a with-block: start releases the lock itself when it raises
    with RunDir(again.path) as fresh:
        assert fresh.start(None, overwrite=True) is None


def test_a_lock_file_left_by_a_dead_process_does_not_block(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    )
    (tmp_path / LOCK_FILE).write_text(dead.stdout)
    run = RunDir(tmp_path)
    assert run.start(None) is None
    assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    run.close()
