"""``lora-dapt`` in one rank of a torchrun job, recording the blocks this rank trains on (for the DDP tests).

``torchrun --nproc_per_node 2 -m tests.distributed_worker RECORD_DIR KILL_AT lora-dapt-args...``:

* every block this rank trains on is appended to ``RECORD_DIR/rank<R>.jsonl`` (its token ids) as its
  training loss is computed, so the test can check which rank trained on what, and the class of the model
  wrapper it trains through is written to ``RECORD_DIR/rank<R>.wrapper``;
* ``KILL_AT`` > 0: once checkpoint-KILL_AT is marked complete, the next training micro-batch SIGKILLs the
  whole process group (torchrun and every rank at once, no cleanup), as a crashed machine would.

The recording wraps lora_dapt's own loss (``lora_dapt.train.trainer.causal_lm_loss_sum``, which
``DAPTTrainer.compute_loss`` looks up at each call); nothing of transformers is touched.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lora_dapt.train.trainer as trainer_module
from lora_dapt.checkpoints import COMPLETE_MARKER
from lora_dapt.cli.main import main


class RecordingLoss:
    """causal_lm_loss_sum, recording each trained block (and killing the job once checkpoint KILL_AT is
    marked)."""

    def __init__(self, record_dir: Path, kill_marker: Path | None) -> None:
        self.path = record_dir / f"rank{os.environ.get('RANK', '0')}.jsonl"
        self.kill_marker = kill_marker
        self.loss = trainer_module.causal_lm_loss_sum

    def __call__(self, model: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        if model.training:
            # the wrapper the Trainer trains through (DistributedDataParallel, FullyShardedDataParallel, ...)
            self.path.with_suffix(".wrapper").write_text(type(model).__name__, encoding="utf-8")
            if self.kill_marker is not None and self.kill_marker.is_file():
                os.killpg(os.getpgrp(), signal.SIGKILL)  # every rank (torchrun puts them in one group)
            with self.path.open("a", encoding="utf-8") as f:
                for row in input_ids.tolist():
                    f.write(json.dumps(row) + "\n")
        return self.loss(model, input_ids, *args, **kwargs)


def run(argv: list[str]) -> int:
    record_dir, kill_at, rest = Path(argv[0]), int(argv[1]), argv[2:]
    record_dir.mkdir(parents=True, exist_ok=True)
    marker = None
    if kill_at > 0:
        from lora_dapt.config import RunConfig

        cfg = RunConfig.from_yaml(rest[1], check=False)
        marker = Path(cfg.train.output_dir) / "checkpoints" / f"checkpoint-{kill_at}" / COMPLETE_MARKER
    trainer_module.causal_lm_loss_sum = RecordingLoss(record_dir, marker)
    return main(rest)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
