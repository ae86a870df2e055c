"""The ``lora-dapt`` command line.

Each subcommand is a thin wrapper over the Python API; errors the user can fix (``LoraDaptError``) are
printed as one readable message with exit status 2, never as a traceback. ``train`` and ``sft`` exit with
the status of :meth:`~lora_dapt.train.pretrain.TrainResult.exit_status` (see :data:`EXIT_CODES`), so
``lora-dapt train x.yaml && lora-dapt merge RUN`` never merges a run that was stopped early.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import LoraDaptError

EPILOG = """\
examples:
  lora-dapt quickstart                          # SmolLM2-135M on Python docs, CPU, ~10 min
  lora-dapt init docs/ -o config.yaml           # a commented config for your data, sized for this machine
  lora-dapt train config.yaml                   # continued pre-training from a YAML config
  lora-dapt train config.yaml --set train.max_steps=500 --set adapter.r=64
  lora-dapt train config.yaml --nproc 2         # DDP over 2 GPUs (torchrun underneath)
  lora-dapt prepare config.yaml                 # corpus statistics only, no training
  lora-dapt vocab config.yaml                   # preview the domain tokens adapter.new_tokens would add
  lora-dapt tune config.yaml --trials 5         # probe learning rates, write tune/chosen.yaml
  lora-dapt report runs/demo                    # report.md + plots for a run directory
  lora-dapt merge runs/demo --dtype bfloat16    # verified 16-bit merged model
  lora-dapt export runs/demo --format gguf --type q8_0   # verified GGUF + Ollama Modelfile
  lora-dapt sft config.yaml                     # instruction tuning on the DAPT run (sft: section)
  lora-dapt plan llama-3-8b --gpu-memory 12GB   # settings that fit an 8B QLoRA run in 12 GB
  lora-dapt config                              # every config key with its default and meaning
"""

EXIT_HELP = """\
exit status of `train` and `sft`:
  0    the run finished
  2    an error (a bad config, missing data, a model that does not load, a NaN/inf loss that stopped
       training: train.on_nonfinite='stop'); the message says what to fix
  3    stopped early by the forgetting budget (eval.max_general_ppl_increase); adapter and checkpoint saved
  130  stopped by Ctrl-C (SIGINT)
  143  stopped by SIGTERM
       A first signal stops at the next safe point: after the current step (with a checkpoint), or after
       the evaluation under way; a second one stops at once. Resume with --set train.resume_from=latest.
       A signal during the evaluation after training lets it finish (the run is complete) and still exits
       130/143, without the merge
"""

EXIT_CODES = {"finished": 0, "error": 2, "forgetting budget": 3, "SIGINT": 130, "SIGTERM": 143}
"""Exit status of ``train`` / ``sft`` by outcome (the --help epilog explains each)."""


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    """INFO (DEBUG with -v, WARNING with -q) for lora_dapt, errors only for the libraries; progress bars only
    on a terminal, none with -q (:mod:`lora_dapt.progress`): the libraries' own ones are switched off too."""
    from ..progress import bars_wanted, library_bars_off

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s lora_dapt: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lora_dapt").setLevel(level)  # also when logging was set up before (basicConfig: no-op)
    for noisy in ("transformers", "datasets", "bitsandbytes", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not bars_wanted():
        library_bars_off()


def _load_config(args: argparse.Namespace, *, check: bool = True):
    from ..config import RunConfig

    return RunConfig.from_yaml(args.config, overrides=args.set, check=check)


def _print_result(result) -> int:
    """A run's summary (without the per-split details) and its before -> after table; returns the exit
    status (:data:`EXIT_CODES`)."""
    print(json.dumps({k: v for k, v in result.to_dict().items() if k not in ("before", "after")}, indent=2))
    if result.forgetting:
        from ..evaluate.forgetting import format_forgetting

        print(format_forgetting(result.forgetting, result.forgetting_as_trained, result.forgetting_reference))
    return result.exit_status()


def cmd_train(args: argparse.Namespace) -> int:
    from ..pipeline import run
    from ..train import distributed

    cfg = _load_config(args)  # a bad config fails here, once, before any process is started
    distributed.check_launcher()  # `accelerate launch --cpu --num_processes N` started one process
    if args.nproc > 1 and not distributed.is_distributed():
        argv = ["train", args.config, *(x for s in args.set for x in ("--set", s))]
        flags = ["-v"] * args.verbose + ["-q"] * args.quiet
        return distributed.launch([*flags, *argv], args.nproc)
    try:
        result = run(cfg)
    finally:
        distributed.shutdown()
    return _print_result(result) if distributed.is_main() else result.exit_status()


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..data.corpus import format_stats, prepare_corpus
    from ..model.load import tokenizer_before_load

    cfg = _load_config(args)
    # the tokenizer alone, read from a GGUF file itself (never dequantized), seq_len checked against the model
    tok = tokenizer_before_load(cfg.model, cfg.data.seq_len)
    corpus = prepare_corpus(cfg.data.sources, tok, cfg.data)
    print(format_stats(corpus.stats))
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from .vocab import vocab_preview

    print(vocab_preview(_load_config(args), args.tokens, args.show))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from ..config import RunConfig
    from ..train.sft import sft_from_config

    # check=False: an SFT-only file has no data.sources; sft_from_config checks what it uses
    result = sft_from_config(RunConfig.from_yaml(args.config, overrides=args.set, check=False))
    return _print_result(result)


def cmd_init(args: argparse.Namespace) -> int:
    from .init import init_command

    return init_command(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from ..planning.cli import plan_command

    return plan_command(args)


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import tune_command

    return tune_command(args)


def _tune_epilog() -> str:
    from .tune import TUNE_EPILOG

    return TUNE_EPILOG


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    result = quickstart(args.output, steps=args.steps, merge=not args.no_merge, overwrite=args.overwrite)
    print(result.table())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from ..config import describe_config

    print(describe_config())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluate.report import write_report

    path = write_report(args.run_dir)
    print(f"report written: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..config import RunConfig
    from ..data.sources import read_text_sources
    from ..evaluate.forgetting import general_texts
    from ..evaluate.score import evaluate_texts
    from ..export.merge import trained_base
    from ..model.load import load_base_model, load_base_model_from
    from ..model.lora import load_adapter
    from ..rundir import RunDir

    target = Path(args.target)
    texts: list[str] = read_text_sources(args.texts) if args.texts else []
    quantization = {"quantization": args.quantization} if args.quantization else {}
    run = RunDir(target)
    if (
        run.read_run_info() is not None
    ):  # a run directory: its base as trained + its adapter, its held-out texts
        model, tok = load_base_model_from(trained_base(run), **quantization)
        model = load_adapter(model, run.adapter_dir)
        texts = texts or run.read_eval_texts() or []
    elif target.suffix in (".yaml", ".yml"):  # a config: its base model, its eval sources
        cfg = RunConfig.from_yaml(target, check=False)
        model, tok = load_base_model_from(cfg.model, **quantization)
        if not texts and cfg.data.eval_sources:
            texts = read_text_sources(cfg.data.eval_sources)
    else:  # a model directory (e.g. a merged model) or a GGUF file: 16-bit unless --quantization says
        quant = None if args.quantization == "none" else args.quantization
        model, tok = load_base_model(target, quantization=quant)
    rows = {}
    if texts:
        rows["domain"] = evaluate_texts(model, tok, texts, seq_len=args.seq_len, max_tokens=args.max_tokens)
    general = general_texts(args.general or None) if not args.no_general else []
    if general:
        rows["general"] = evaluate_texts(
            model, tok, general, seq_len=args.seq_len, max_tokens=args.max_tokens
        )
    if not rows:
        print("nothing to evaluate: pass --texts FILES (and/or --general FILES)", file=sys.stderr)
        return 2
    print(f"{'split':<8} {'tokens':>9} {'loss':>8} {'ppl':>9} {'bits/byte':>9}")
    for split, r in rows.items():
        bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "-"
        print(f"{split:<8} {r.tokens:>9} {r.loss:>8.4f} {r.ppl:>9.3f} {bpb:>9}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..export.merge import merge_run

    out = merge_run(
        args.run_dir,
        output_dir=args.output,
        dtype=args.dtype,
        base_source=args.base_source,
        device=args.device,
        tolerance=args.tolerance,
        overwrite=args.overwrite,
    )
    print(f"merged model written: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.gguf import export_gguf, format_export

    result = export_gguf(args.source, args.output, type=args.type, overwrite=args.overwrite)
    print(format_export(result))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "quickstart": (cmd_quickstart, "adapt SmolLM2-135M to Python's docs on this machine: train, eval, merge"),
    "init": (cmd_init, "write a commented config for your data, sized for this machine (lora-dapt plan)"),
    "train": (cmd_train, "continued pre-training from a YAML config"),
    "sft": (cmd_sft, "instruction tuning (SFT) on a DAPT run, a merged model or a base model"),
    "prepare": (cmd_prepare, "read, clean, split and pack the corpus; print its statistics"),
    "vocab": (cmd_vocab, "preview the domain tokens adapter.new_tokens adds (tokens/char before -> after)"),
    "config": (cmd_config, "list every config key with its default and meaning"),
    "report": (cmd_report, "write report.md and plots for a run directory"),
    "merge": (cmd_merge, "merge a run's adapter into a verified 16-bit model"),
    "export": (cmd_export, "write a merged model as a verified GGUF file (llama.cpp, Ollama) + Modelfile"),
    "plan": (cmd_plan, "pick seq_len, batch, accumulation, checkpointing, optimizer to fit a GPU"),
    "eval": (cmd_eval, "perplexity / bits-per-byte of a run, a config's base model, or a model directory"),
    "tune": (cmd_tune, "probe learning rates (ranks, tokens/step) on one base; write the best config"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-dapt",
        description="Domain-adaptive continued pre-training of causal LMs with LoRA/QLoRA.",
        epilog=EPILOG + "\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress (results printed)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXIT_HELP if name in ("train", "sft") else (_tune_epilog() if name == "tune" else None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        if name == "vocab":
            p.add_argument(
                "--tokens", type=int, default=None, help="tokens to mine (default adapter.new_tokens)"
            )
            p.add_argument("--show", type=int, default=40, help="tokens to list (default 40)")
        if name in ("train", "prepare", "sft", "tune", "vocab"):
            p.add_argument("config", help="YAML config file (see `lora-dapt config` for every key)")
            p.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="SECTION.KEY=VALUE",
                help="override a config value, e.g. --set train.learning_rate=1e-4 (repeatable)",
            )
        if name == "train":
            p.add_argument(
                "--nproc",
                type=int,
                default=1,
                metavar="N",
                help="train in N processes, one per GPU (DDP; gloo on the CPU): starts "
                "`python -m torch.distributed.run --nproc_per_node N -m lora_dapt.cli train CONFIG`",
            )
        if name in ("report", "merge"):
            p.add_argument("run_dir", help="run directory (train.output_dir of a finished run)")
        if name == "merge":
            p.add_argument("--output", default=None, help="output directory (default RUN_DIR/merged)")
            p.add_argument(
                "--dtype",
                default=None,
                choices=["auto", "bfloat16", "float16", "float32"],
                help="merged weights' dtype; auto (default): the base's own, or the next wider that keeps the update",
            )
            p.add_argument(
                "--base-source",
                default=None,
                choices=["original", "dequantized"],
                help="merge into the original 16-bit base (default) or the dequantized 4-bit base",
            )
            p.add_argument("--device", default=None, help="auto (default), cpu or cuda[:N]")
            p.add_argument(
                "--tolerance", type=float, default=None, help="allowed relative |logit| difference"
            )
            p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
        if name == "export":
            p.add_argument("source", help="run directory (its merged/ is exported) or merged model directory")
            p.add_argument("--format", default="gguf", choices=["gguf"], help="file format (gguf)")
            p.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0"], help="weight type")
            p.add_argument("--output", default=None, help="the .gguf path (default RUN/<run>-<type>.gguf)")
            p.add_argument("--overwrite", action="store_true", help="replace an existing file")
        if name == "init":
            from .init import add_init_arguments

            add_init_arguments(p)
        if name == "plan":
            from ..planning.cli import add_plan_arguments

            add_plan_arguments(p)
        if name == "tune":
            from .tune import add_tune_arguments

            add_tune_arguments(p)
        if name == "quickstart":
            p.add_argument(
                "--output", default="runs/quickstart", help="run directory (default runs/quickstart)"
            )
            p.add_argument(
                "--overwrite", action="store_true", help="replace an earlier quickstart run in --output"
            )
            p.add_argument(
                "--steps", type=int, default=None, help="optimizer steps (default 24, ~5 min on 2 cores)"
            )
            p.add_argument("--no-merge", action="store_true", help="skip the verified merge at the end")
        if name == "eval":
            p.add_argument("target", help="run directory, YAML config, model directory or .gguf file")
            p.add_argument("--texts", nargs="+", default=None, help="domain text files/dirs/globs to score")
            p.add_argument(
                "--general", nargs="+", default=None, help="general text files (default: built-in)"
            )
            p.add_argument("--no-general", action="store_true", help="skip the general-text measurement")
            p.add_argument("--quantization", default=None, choices=["nf4", "fp4", "int8", "none"])
            p.add_argument(
                "--seq-len", type=int, default=None, help="window length (default: model max, <=1024)"
            )
            p.add_argument("--max-tokens", type=int, default=200_000, help="cap on tokens scored per split")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    previous_level = logging.getLogger("lora_dapt").level  # put back at the end (main called in-process)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except LoraDaptError as e:
        print(f"lora-dapt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        status = _interrupted_status(e)
        how = " (resume with --set train.resume_from=latest)" if args.command in ("train", "sft") else ""
        print(
            f"lora-dapt {args.command}: interrupted by {signal.Signals(status - 128).name}{how}",
            file=sys.stderr,
        )
        return status
    finally:
        logging.getLogger("lora_dapt").setLevel(previous_level)


def _interrupted_status(err: KeyboardInterrupt) -> int:
    """128 + the signal's number: a second SIGTERM during training is a RunInterrupted naming it; any other
    KeyboardInterrupt is Ctrl-C (130)."""
    trainer = sys.modules.get("lora_dapt.train.trainer")  # only a loaded trainer can have raised one
    if trainer is not None and isinstance(err, trainer.RunInterrupted):
        return 128 + err.signum
    return 128 + signal.SIGINT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
