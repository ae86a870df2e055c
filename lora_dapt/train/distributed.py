"""More than one process: who this process is, where the ranks wait for each other, and how to start them.

lora_dapt writes no distributed engine of its own. ``torchrun`` (or ``accelerate launch``) starts one
process per device and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; accelerate's ``PartialState``
opens the process group from them (nccl on CUDA, gloo on the CPU) and transformers' Trainer does DDP or
FSDP through accelerate: each rank trains on its own shard of the packed blocks (accelerate's
``BatchSamplerShard``: batch ``i`` of the shared, seeded order goes to rank ``i % world_size``) and the
gradients are averaged across ranks. What lora_dapt adds:

* **rank 0 alone writes the run directory** (:class:`~lora_dapt.rundir.RunDir` skips its writes on the other
  ranks), and the others wait for it where they must: :func:`run_on_main` runs a step (taking the lock,
  choosing the checkpoint to resume from) on rank 0 and hands its result, or its error, to every rank;
* :func:`barrier` before a checkpoint is marked complete (every rank has saved its RNG state by then);
* :func:`any_rank` so that a signal seen by one rank stops every rank at the same step;
* :func:`shard_stats`: how the blocks of an epoch are dealt to the ranks, stated in the log and the
  summary (accelerate repeats a few blocks from the start when the last global batch is not full, so every
  rank gets full batches: they are counted, never hidden);
* :func:`check_launcher`: refuses ``accelerate launch --cpu --num_processes N`` (accelerate starts ONE
  process then: several CPU processes need its mpirun mode; ``accelerate launch --multi_gpu`` runs torchrun
  and, without CUDA, gloo on the CPU) and FSDP on the CPU (accelerate shards on GPUs only);
* :func:`launch_command` / :func:`launch`: ``lora-dapt train CONFIG --nproc N`` starts
  ``python -m torch.distributed.run --nproc_per_node N -m lora_dapt.cli train CONFIG``.

Everything here reads the process's environment and torch.distributed's own state; nothing is cached in
module globals. Without a launcher (``WORLD_SIZE`` unset or 1) every helper is a no-op on one process.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ..errors import ConfigError

log = logging.getLogger("lora_dapt")
_T = TypeVar("_T")


def _dist() -> Any | None:
    """torch.distributed when its process group is open, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the run: the process group's size, else ``WORLD_SIZE`` (set by the launchers), else 1."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    """This process's rank on its machine: the index of the GPU it trains on (0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """True on the process that writes the run directory (rank 0; the only process without a launcher)."""
    return rank() == 0


def is_distributed() -> bool:
    """True when this process is one of several (started by torchrun / accelerate launch)."""
    return world_size() > 1


def init() -> None:
    """Open the process group if a launcher started several processes and nobody opened it yet.

    accelerate's ``PartialState`` does it (nccl on CUDA, gloo on the CPU), the same state the Trainer uses
    later; lora_dapt needs it earlier, to let rank 0 take the run directory's lock while the others wait.
    Without CUDA it must be asked for the CPU (``cpu=True``): otherwise it sees no device to pair with
    ``LOCAL_RANK`` and opens no group at all, and every rank would run rank 0's steps itself.
    """
    check_launcher()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and _dist() is None:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def check_launcher(cpu: bool | None = None) -> None:
    """Refuse the two launches that would not train what was asked, before anything is loaded:

    * ``accelerate launch --cpu --num_processes N`` (N > 1) without an MPI host file: accelerate then starts
      ONE process (its multi-CPU mode runs through ``mpirun``), which would silently train with a global
      batch N times smaller. It is recognised by what accelerate's simple launcher sets:
      ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR`` (only set for several processes), and no world size.
    * FSDP (``ACCELERATE_USE_FSDP``, from an accelerate FSDP config) on the CPU (``cpu``; None: no CUDA
      here). accelerate 1.x turns FSDP on only for GPU-like devices: on the CPU its state stays MULTI_CPU
      and the Trainer silently runs DDP, every rank holding the whole model; with
      ``fsdp_sync_module_states: true`` it fails instead, inside the Trainer, with "There are currently no
      available devices found, must be one of 'XPU', 'CUDA', ...".

    Raises:
        ConfigError: naming the commands that do work.
    """
    from accelerate.utils import get_int_from_env, str_to_bool

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu and str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")) == 1:
        raise ConfigError(
            "FSDP on the CPU: accelerate shards models with FSDP on GPUs only (on the CPU it would run plain "
            "DDP, every process holding the whole model, or fail with sync_module_states). Train on the CPU "
            "with DDP: `lora-dapt train CONFIG --nproc N`; use the FSDP config (examples/"
            "fsdp_qlora_accelerate.yaml) on a machine with N GPUs"
        )

    sizes = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]
    asked_cpu = str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")) == 1
    if asked_cpu and os.environ.get("MASTER_ADDR") and get_int_from_env(sizes, 0) == 0:
        raise ConfigError(
            "accelerate launch --cpu with several processes started only this one: accelerate runs several "
            "CPU processes through mpirun (--mpirun_hostfile) only. On one machine use "
            "`lora-dapt train CONFIG --nproc N`, `torchrun --nproc_per_node N -m lora_dapt.cli train CONFIG`, "
            "or `accelerate launch --multi_gpu --num_processes N -m lora_dapt.cli train CONFIG` (without CUDA "
            "the ranks train on the CPU over gloo)"
        )


def barrier() -> None:
    """Every rank waits here until all have arrived (a no-op on one process)."""
    init()
    dist = _dist()
    if dist is not None:
        dist.barrier()


def run_on_main(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on rank 0 only and return its result on every rank; an exception raised by ``fn`` is
    raised on every rank (the others wait meanwhile, so none runs ahead of a refusal).

    The result travels with ``torch.distributed.broadcast_object_list`` (it must pickle). On one process
    this is ``fn()``.
    """
    init()
    dist = _dist()
    if dist is None:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # handed to the other ranks, then raised here too
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: every rank must call it)."""
    dist = _dist()
    if dist is None:
        return flag
    import torch

    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.to(f"cuda:{local_rank()}")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown() -> None:
    """Close the process group at the end of a run (torch warns when a process exits with it open)."""
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# How an epoch's blocks are dealt to the ranks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardStats:
    """How one epoch of ``blocks`` is dealt to ``world_size`` ranks in batches of ``batch_size``.

    accelerate (``even_batches=True``, the Trainer's default) gives every rank the same number of full
    batches: batch ``i`` of the shuffled order goes to rank ``i % world_size``, and when the last round is
    not full it is completed with blocks from the start of the epoch, which are then trained twice
    (``repeated``). With ``blocks`` a multiple of ``batch_size x world_size`` every block is trained exactly
    once per epoch across the ranks.

    >>> s = shard_stats(10, batch_size=2, world_size=2)
    >>> s.blocks_per_rank, s.repeated
    (6, 2)
    """

    blocks: int
    world_size: int
    batch_size: int
    blocks_per_rank: int
    """Blocks each rank trains on per epoch."""
    repeated: int
    """Blocks trained twice per epoch to fill the last round of batches (0: each block exactly once)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the log."""
        once = (
            "each block exactly once across the ranks"
            if self.repeated == 0
            else f"{self.repeated} block(s) from the start repeated to fill the last round of batches "
            f"(make the block count a multiple of batch_size x world_size = "
            f"{self.batch_size * self.world_size} to avoid it)"
        )
        return (
            f"epoch of {self.blocks} blocks over {self.world_size} rank(s): {self.blocks_per_rank} per rank, "
            f"{once}"
        )


def shard_stats(blocks: int, batch_size: int, world_size: int) -> ShardStats:
    """How an epoch of ``blocks`` is dealt to the ranks (see :class:`ShardStats`)."""
    if world_size <= 1:
        return ShardStats(blocks, 1, batch_size, blocks, 0)
    rounds = math.ceil(math.ceil(blocks / batch_size) / world_size)
    per_rank = rounds * batch_size
    return ShardStats(blocks, world_size, batch_size, per_rank, per_rank * world_size - blocks)


def global_batch(batch_size: int, accumulation: int, world: int) -> int:
    """Blocks per optimizer step: micro-batch x gradient accumulation x ranks."""
    return batch_size * accumulation * world


# ---------------------------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------------------------


def launch_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command that runs ``lora-dapt ARGV`` in ``nproc`` processes on this machine.

    >>> launch_command(["train", "cfg.yaml"], 2)[1:]
    ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'lora_dapt.cli', 'train', 'cfg.yaml']
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "lora_dapt.cli",
        *argv,
    ]


def launch(argv: list[str], nproc: int) -> int:
    """Run ``lora-dapt ARGV`` under torchrun in ``nproc`` processes; returns torchrun's exit status (the
    first failing rank's). Ctrl-C reaches torchrun too, which passes it on to the ranks."""
    cmd = launch_command(argv, nproc)
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
