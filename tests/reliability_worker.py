"""A training run in its own process, for the kill / SIGINT tests (python -m tests.reliability_worker ...)."""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset

from lora_dapt import AdapterConfig, EvalConfig, TrainConfig
from lora_dapt.data.packing import pack_documents
from lora_dapt.model.load import load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.train.pretrain import continued_pretrain
from tests.conftest import make_text

MAX_STEPS = 16


def main(model_dir: str, out_dir: str, resume: str) -> int:
    model, tok = load_base_model(model_dir, quantization="nf4")
    torch.manual_seed(0)
    model = apply_lora(model, AdapterConfig(r=4, alpha=8, dropout=0.1, gradient_checkpointing=False))
    docs = [
        [tok.bos_token_id, *tok(make_text(25, s), add_special_tokens=False).input_ids, tok.eos_token_id]
        for s in range(40)
    ]
    ds = Dataset.from_list(pack_documents(docs, 32, tok.pad_token_id))
    cfg = TrainConfig(
        output_dir=out_dir,
        max_steps=MAX_STEPS,
        learning_rate=5e-3,
        batch_size=2,
        gradient_accumulation_steps=2,
        warmup_steps=2,
        save_every=2,
        save_total_limit=3,
        resume_from=resume or None,
    )
    result = continued_pretrain(model, tok, ds, cfg, eval_config=EvalConfig(enabled=False))
    print(json.dumps({"steps": result.steps, "stopped": result.stopped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
