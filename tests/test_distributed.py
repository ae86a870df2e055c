"""Multi-process training on the CPU (gloo, 2 processes, the tiny model): DDP through torchrun, accelerate
launch and ``lora-dapt train --nproc``, against one process with twice the gradient accumulation; the
launches that cannot train as asked on the CPU (``accelerate launch --cpu`` with several processes, FSDP)
refused with a readable error.

Two ranks with accumulation A see, per optimizer step, the same blocks as one process with accumulation
2A (accelerate deals batch i of the shared seeded order to rank i % 2), and the loss is normalised by all
ranks' tokens: the adapters must agree to float rounding, and so must every logged loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_dapt import EvalConfig
from lora_dapt.cli.main import main
from lora_dapt.rundir import RunDir
from lora_dapt.train.distributed import launch_command, shard_stats

from .conftest import make_text

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240
BATCH, STEPS, BLOCKS = 2, 13, 52
"""13 steps of 2 blocks x 2 ranks (or x accumulation 2) are one epoch of the 52 training blocks."""


def _config(tmp: Path, model_dir: Path, name: str, *, accumulation: int, model=None, **train) -> Path:
    docs = tmp / "docs"
    if not docs.is_dir():
        docs.mkdir()
        for i in range(8):
            (docs / f"d{i}.txt").write_text(make_text(70 + 5 * i, seed=500 + i), encoding="utf-8")
    cfg = {
        "model": {
            "name_or_path": str(model_dir),
            "quantization": "nf4",
            "compute_dtype": "float32",
            **(model or {}),
        },
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "gradient_checkpointing": False},
        "data": {
            "sources": [str(docs)],
            "seq_len": 32,
            "eval_fraction": 0.2,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {
            "output_dir": str(tmp / name),
            "max_steps": STEPS,
            "learning_rate": 5e-3,
            "warmup_steps": 1,
            "scheduler": "cosine",
            "batch_size": BATCH,
            "gradient_accumulation_steps": accumulation,
            "logging_every": 1,
            "save_every": 0,
            "seed": 7,
            **train,
        },
        "eval": {"general": False, "prompts": []},
    }
    if "original_base" in EvalConfig.__dataclass_fields__:
        cfg["eval"]["original_base"] = False
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _launch(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _torchrun(record: Path, kill_at: int, *argv: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "tests.distributed_worker", str(record), str(kill_at), *argv,
    ]  # fmt: skip


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in RunDir(run_dir).read_metrics() if r["type"] == "train"]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(run: Path, reference: Path) -> None:
    got, want = _losses(run), _losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # every step logged exactly once
    assert [s for s, _ in want] == list(range(1, STEPS + 1))
    torch.testing.assert_close([x for _, x in got], [x for _, x in want], rtol=1e-4, atol=1e-5)
    a, b = _adapter(run), _adapter(reference)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it did train


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """One process, accumulation 2: what every 2-process run below must reproduce."""
    tmp = tmp_path_factory.mktemp("ddp")
    assert main(["train", str(_config(tmp, tiny_model_dir, "one", accumulation=2))]) == 0
    return tmp / "one"


def test_torchrun_matches_one_process(reference, tiny_model_dir):
    tmp = reference.parent
    cfg = _config(tmp, tiny_model_dir, "two", accumulation=1)
    _launch(_torchrun(tmp / "blocks", 0, "train", str(cfg)))
    run = tmp / "two"
    _assert_same_run(run, reference)
    summary = RunDir(run).read_summary()
    one = RunDir(reference).read_summary()
    assert summary["steps"] == STEPS and summary["tokens_trained"] == one["tokens_trained"]
    for phase in ("before", "after"):  # the evaluations give one process's numbers
        assert summary[phase]["domain"]["loss"] == pytest.approx(one[phase]["domain"]["loss"], rel=1e-5)
        assert summary[phase]["domain"]["tokens"] == one[phase]["domain"]["tokens"]
    # one epoch: every block trained exactly once across the ranks, each rank on its own half
    assert summary["data_stats"]["train_blocks"] == BLOCKS, "the test data must pack to 52 training blocks"
    assert summary["shards"] == {
        "blocks": BLOCKS, "world_size": 2, "batch_size": BATCH, "blocks_per_rank": BLOCKS // 2, "repeated": 0
    }  # fmt: skip
    ranks = [
        [tuple(json.loads(line)) for line in (tmp / "blocks" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == BLOCKS // 2
    assert not set(ranks[0]) & set(ranks[1])
    seen = Counter(ranks[0] + ranks[1])
    assert len(seen) == BLOCKS and set(seen.values()) == {1}


def test_torchrun_with_compiled_layers_matches_one_eager_process(reference, tiny_model_dir):
    """train.compile=true under DDP: each rank compiles its layers; the run is still the one-process run."""
    tmp = reference.parent
    cfg = _config(tmp, tiny_model_dir, "two-compiled", accumulation=1, compile=True)
    _launch(_torchrun(tmp / "blocks-compiled", 0, "train", str(cfg)))
    _assert_same_run(tmp / "two-compiled", reference)
    assert RunDir(tmp / "two-compiled").read_summary()["compiled"] is True
    assert RunDir(reference).read_summary()["compiled"] is False


def test_accelerate_launch_matches_one_process(reference, tiny_model_dir):
    """`accelerate launch --multi_gpu --num_processes 2` runs torchrun underneath; without CUDA the ranks
    train on the CPU over gloo and must reproduce one process with accumulation 2 exactly."""
    tmp = reference.parent
    cfg = _config(tmp, tiny_model_dir, "accel", accumulation=1)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", "0", "-m", "tests.distributed_worker"]  # 0: a free port
    _launch([*launcher, str(tmp / "accel-blocks"), "0", "train", str(cfg)])
    _assert_same_run(tmp / "accel", reference)
    assert RunDir(tmp / "accel").read_summary()["shards"]["world_size"] == 2
    assert (tmp / "accel-blocks" / "rank0.wrapper").read_text() == "DistributedDataParallel"
    counts = [len((tmp / "accel-blocks" / f"rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert counts == [BLOCKS // 2, BLOCKS // 2]


def test_accelerate_cpu_flag_with_several_processes_is_refused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's multi-CPU mode needs
    mpirun): it sets ACCELERATE_USE_CPU and MASTER_ADDR but no world size. Training it would halve the
    global batch silently, so `lora-dapt train` refuses, naming the commands that work."""
    cfg = _config(tmp_path, tiny_model_dir, "cpu-flag", accumulation=1)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "accelerate launch --cpu with several processes started only this one" in err
    assert "--nproc N" in err and "accelerate launch --multi_gpu --num_processes N" in err
    assert not (tmp_path / "cpu-flag").exists()  # refused before anything was written
    monkeypatch.delenv("MASTER_ADDR")  # one process asked for (no MASTER_ADDR): nothing to refuse
    from lora_dapt.train.distributed import check_launcher

    check_launcher()


FSDP_CPU = """\
distributed_type: FSDP
num_machines: 1
num_processes: 2
main_process_port: 0
mixed_precision: "no"
fsdp_config:
  fsdp_version: 1
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: false
  fsdp_sync_module_states: false
  fsdp_use_orig_params: true
  fsdp_state_dict_type: FULL_STATE_DICT
"""
"""An accelerate FSDP config as close as the CPU gets (sync_module_states needs a GPU in accelerate)."""

FSDP_REFUSED = "FSDP on the CPU: accelerate shards models with FSDP on GPUs only"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; GPUs: benchmarks/bench_gpu.py --fsdp")
def test_fsdp_on_the_cpu_is_refused_by_every_rank(tmp_path, tiny_model_dir):
    """accelerate 1.x turns FSDP on for GPU-like devices only: on the CPU (MULTI_CPU) the Trainer would
    silently run DDP (tried: every rank trained through DistributedDataParallel), or, with
    sync_module_states, fail inside the Trainer with "There are currently no available devices found".
    `lora-dapt train` refuses it on every rank, with the commands that work, before loading anything."""
    cfg = _config(tmp_path, tiny_model_dir, "fsdp", accumulation=1, model={"quant_storage": "float32"})
    (tmp_path / "fsdp_cpu.yaml").write_text(FSDP_CPU)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(tmp_path / "fsdp_cpu.yaml"),
    ]
    cmd += ["-m", "lora_dapt.cli", "train", str(cfg)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert proc.stderr.count("lora-dapt train: error: invalid configuration") == 2, proc.stderr[-3000:]
    assert proc.stderr.count(f"  - {FSDP_REFUSED}") == 2
    assert "exitcode  : 2" in proc.stderr  # our user-error status, not a Python traceback (exit 1)
    assert "[rank0]: Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr
    assert not (tmp_path / "fsdp").exists()


def test_fsdp_refused_when_the_model_is_on_the_cpu(monkeypatch):
    """The same refusal from the Python API: continued_pretrain checks with the model's device."""
    from lora_dapt.errors import ConfigError
    from lora_dapt.train.distributed import check_launcher

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=FSDP_REFUSED):
        check_launcher(cpu=True)
    check_launcher(cpu=False)  # on GPUs accelerate does shard
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_launcher(cpu=True)


@pytest.mark.slow  # two more 2-process launches: ~70 s on 2 shared cores
def test_sigkill_both_ranks_then_resume_with_nproc(reference, tiny_model_dir):
    """Both ranks SIGKILLed after checkpoint 6; `lora-dapt train --nproc 2` resumes."""
    tmp = reference.parent
    cfg = _config(tmp, tiny_model_dir, "killed", accumulation=1, save_every=3, save_total_limit=10)
    proc = subprocess.run(
        _torchrun(tmp / "killed-blocks", 6, "train", str(cfg)),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, start_new_session=True,
    )  # fmt: skip
    # torchrun runs the ranks in their own process group: both died of the SIGKILL, torchrun reports it
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("exitcode  : -9") == 2, proc.stderr[-3000:]
    run = RunDir(tmp / "killed")
    assert [p.name for p in run.checkpoints()][0] in ("checkpoint-6", "checkpoint-9")
    assert not run.has_adapter() and run.read_summary() is None
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TQDM_DISABLE")}
    os.environ.update({"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    try:
        status = main(["train", str(cfg), "--nproc", "2", "--set", "train.resume_from=latest"])
    finally:
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert status == 0
    _assert_same_run(run.path, reference)
    assert run.read_summary()["steps"] == STEPS


def test_shard_stats_match_accelerate():
    """What the log and the summary say about the epoch's deal is what accelerate does."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    for blocks, batch, world in [(12, 2, 2), (10, 2, 2), (7, 3, 2), (9, 2, 4)]:
        dealt = [
            i
            for r in range(world)
            for b in BatchSamplerShard(BatchSampler(range(blocks), batch, False), world, r, even_batches=True)
            for i in b
        ]
        s = shard_stats(blocks, batch, world)
        assert len(dealt) == s.blocks_per_rank * world
        assert set(dealt) == set(range(blocks))
        assert len(dealt) - blocks == s.repeated, (blocks, batch, world)
    assert shard_stats(12, 2, 2).repeated == 0 and shard_stats(10, 2, 2).repeated == 2


def test_launch_command():
    cmd = launch_command(["train", "c.yaml", "--set", "train.max_steps=3"], 4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[-6:] == ["-m", "lora_dapt.cli", "train", "c.yaml", "--set", "train.max_steps=3"]
