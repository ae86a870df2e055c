"""``lora-dapt tune CONFIG``: the arguments and the command (the work is :func:`lora_dapt.train.tune.tune`)."""

from __future__ import annotations

import argparse

TUNE_EPILOG = """\
examples:
  lora-dapt tune config.yaml                                 # 5 learning rates around train.learning_rate
  lora-dapt tune config.yaml --trials 7 --budget-tokens 100000
  lora-dapt tune config.yaml --lr 1e-4 3e-4 1e-3 --ranks 16 64 --tokens-per-step 8192 16384
  lora-dapt train runs/demo/tune/chosen.yaml                 # train with the chosen settings

Each trial trains a fresh adapter on the same first N tokens of the corpus (the 4-bit base is loaded once)
and is scored on held-out domain text and on general text, on the original 16-bit model with the trial's
adapter on it (what the merge ships; loaded once) unless --score-on as_trained. The choice is the lowest domain perplexity whose
general perplexity rose at most the forgetting budget (eval.max_general_ppl_increase, else 5%). A rerun of
the same command skips the trials already done.

exit status: 0 a trial was chosen, 2 an error, 3 no trial inside the forgetting budget (nothing chosen),
130/143 stopped by SIGINT/SIGTERM (rerun to continue)
"""


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lora-dapt tune`` (CONFIG and --set come from main.py, as for train)."""
    p.add_argument(
        "--budget-tokens",
        type=int,
        default=None,
        help="training tokens per trial (default: a quarter of the run's)",
    )
    p.add_argument("--trials", type=int, default=None, help="learning rates in the log grid (default 5)")
    p.add_argument(
        "--lr", type=float, nargs="+", default=None, help="learning rates to try (instead of the grid)"
    )
    p.add_argument(
        "--lr-span", type=float, default=None, help="the grid spans lr / SPAN .. lr x SPAN (default 4)"
    )
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks to try (alpha follows)")
    p.add_argument(
        "--tokens-per-step", type=int, nargs="+", default=None, help="tokens per optimizer step to try"
    )
    p.add_argument(
        "--eval-tokens", type=int, default=None, help="tokens scored per split per trial (default 20000)"
    )
    p.add_argument(
        "--max-general-ppl-increase",
        type=float,
        default=None,
        help="forgetting budget of the choice (default eval.max_general_ppl_increase, else 0.05)",
    )
    p.add_argument(
        "--score-on",
        choices=["original", "as_trained"],
        default=None,
        help="score trials on the original 16-bit model with each adapter on it (default, when it fits) or on "
        "the 4-bit base as trained",
    )
    p.add_argument("--output", default=None, help="tune directory (default TRAIN_OUTPUT_DIR/tune)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier tune in the directory")


def tune_command(args: argparse.Namespace) -> int:
    """Run the tune, print its table; the exit status of :meth:`TuneResult.exit_status`."""
    from ..config import RunConfig
    from ..train.tune import TuneConfig, tune

    config = RunConfig.from_yaml(args.config, overrides=args.set)
    given = {
        "budget_tokens": args.budget_tokens,
        "trials": args.trials,
        "learning_rates": args.lr,
        "lr_span": args.lr_span,
        "ranks": args.ranks,
        "tokens_per_step": args.tokens_per_step,
        "max_eval_tokens": args.eval_tokens,
        "max_general_ppl_increase": args.max_general_ppl_increase,
        "output_dir": args.output,
        "score_on": args.score_on,
    }
    options = TuneConfig.from_dict(
        {k: v for k, v in given.items() if v is not None} | {"overwrite": args.overwrite}
    )
    result = tune(config, options)
    if result.signal is None:
        print(result.table())
        if result.chosen_config:
            print(f"chosen config: {result.chosen_config}   (lora-dapt train {result.chosen_config})")
        if result.plot_path:
            print(f"plot: {result.plot_path}")
    return result.exit_status()
