"""``lora-dapt tune``: short probe runs over a grid of learning rates (ranks, tokens per step), on one base.

:func:`tune` reads top to bottom: load the corpus and the 4-bit base ONCE -> score the base -> state the
cost -> per trial: attach a fresh LoRA adapter, train it with :func:`~lora_dapt.train.pretrain.
continued_pretrain` (the training path of every run, into ``TUNE_DIR/trials/lr<LR>-r<R>-t<TOKENS>``), score it, take the
adapter off again (peft ``unload``), check that the base weights are bit-identical -> choose -> table, plot,
chosen config.

What makes trials comparable: every trial trains on the same ``budget_tokens`` of the training blocks, a
sample drawn with train.seed (:func:`probe_blocks`: packed blocks are stored in packing order, so the first
blocks would be a few documents, and replay or other mixture components, packed after the domain, would
be missing), in one pass with the same seed (so the same order and the same LoRA init), with the run's
schedule shape (warmup as the same fraction of the steps, the same decay and floor), and is scored on the same capped number of
held-out domain tokens and general-text tokens (``max_eval_tokens`` each), on the original 16-bit model with
the trial's adapter attached (``score_on: original``, the default, loaded once: :mod:`.tune_score`) or on
the 4-bit base as trained (``score_on: as_trained``, or when the original does not fit).

The choice: the trial with the lowest held-out domain perplexity among those whose general perplexity rose
by at most the forgetting budget over the base's (``max_general_ppl_increase``; default the config's
``eval.max_general_ppl_increase``, else :data:`DEFAULT_FORGETTING_BUDGET`, 5%). None when no trial stays
inside it (the CLI then exits 3 and writes no chosen config).

Trade-off: a probe is shorter than the run, and a short run favours a higher learning rate than a long one
would; give ``budget_tokens`` a good share of the run's tokens when the choice matters (default: a quarter).
On the 4-bit base as trained an adapter also learns back part of the quantization loss, which flatters
both gain and forgetting; the 16-bit figures are what the merged model scores.

Resuming: finished trials are rows of ``trials.jsonl``; a rerun with the same plan (``tune.json``: budget,
data, eval and schedule fingerprints) skips them and gives the same choice; another plan is refused unless
``overwrite``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import EvalConfig, RunConfig
from ..errors import ConfigError, DataError, TrainingError
from ..rundir import RunDir
from .tune_dir import TuneDir
from .tune_grid import (
    Trial,
    TrialResult,
    TuneConfig,
    TuneResult,
    budget_blocks,
    choose,
    chosen_run_config,
    forgetting_budget,
    make_grid,
    probe_blocks,
    warmup_share,
)
from .tune_score import TrialScorer

log = logging.getLogger("lora_dapt")

# ---------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------


def tune(
    config: RunConfig | str | Path,
    options: TuneConfig | None = None,
    *,
    callbacks: list[Any] | None = None,
    **overrides: Any,
) -> TuneResult:
    """Probe a grid of learning rates (and ranks / tokens per step) on one loaded base; choose the best domain
    gain inside the forgetting budget and write the chosen config.

    Args:
        config: the run's RunConfig (or its YAML file): model, data, adapter, train and eval as for a run.
        options: the search (:class:`TuneConfig`); ``overrides`` replace single fields of it.
        callbacks: extra ``transformers.TrainerCallback`` objects given to every trial's trainer.

    Returns:
        a :class:`TuneResult`; ``TUNE_DIR/chosen.yaml`` holds the chosen config when there is a choice.

    Example::

        import lora_dapt as ld
        result = ld.tune(ld.RunConfig.from_yaml("config.yaml"), trials=5, budget_tokens=50_000)
        print(result.table())   # then: lora-dapt train runs/demo/tune/chosen.yaml
    """
    from transformers import set_seed

    from ..data.corpus import prepare_corpus
    from ..evaluate.forgetting import general_texts
    from ..model.load import load_base_model_from, tokenizer_before_load

    if not isinstance(config, RunConfig):
        config = RunConfig.from_yaml(config)
    config.check()
    options = (options or TuneConfig()).replace(**overrides)
    tokenizer = tokenizer_before_load(config.model, config.data.seq_len)
    general = general_texts(config.eval.general_sources or None)  # tune always measures forgetting
    corpus = prepare_corpus(config.data.sources, tokenizer, config.data)
    loaded = load_base_model_from(config.model)
    set_seed(config.train.seed)
    return run_trials(
        loaded.model,
        loaded.tokenizer,
        corpus,
        general,
        config,
        options,
        source=loaded.source,
        callbacks=callbacks,
    )


def run_trials(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    general: list[str],
    config: RunConfig,
    options: TuneConfig,
    *,
    source: Any = None,
    callbacks: list[Any] | None = None,
) -> TuneResult:
    """:func:`tune` on a base model and corpus already loaded (``model`` without an adapter; it is returned
    to that state, weights bit-identical, after every trial)."""
    eval_ds = getattr(corpus, "eval", None)
    if eval_ds is None or len(eval_ds) == 0:
        raise DataError(
            "tune scores held-out domain text, and this corpus holds none out: set data.eval_fraction > 0 "
            "or data.eval_sources"
        )
    seq_len = len(corpus.train[0]["input_ids"])
    trials = make_grid(config, options, seq_len)
    n_blocks = budget_blocks(config, options, trials, len(corpus.train), seq_len)
    train_ds = probe_blocks(corpus.train, n_blocks, config.train.seed)
    warmup = warmup_share(config, len(corpus.train), seq_len)
    eval_cfg = EvalConfig(max_eval_tokens=options.max_eval_tokens, batch_size=config.eval.batch_size)
    budget = forgetting_budget(options, config)
    out = Path(options.output_dir) if options.output_dir else RunDir(config.train.output_dir).tune_dir
    if source is None:
        from ..model.load import ModelSource

        source = ModelSource.of_model(model)

    with (
        TuneDir(out).lock() as tdir,
        TrialScorer.create(
            model,
            tokenizer,
            eval_ds,
            general,
            eval_cfg,
            source,
            options.score_on,
            trust_remote_code=config.model.trust_remote_code,
        ) as scorer,
    ):
        plan = _plan(config, options, source, model, train_ds, eval_ds, general, seq_len)
        plan["scored_on"] = scorer.scored_on
        base, done = _resume(tdir, plan, options.overwrite)
        if base is None:
            base = scorer.score_base(model, tdir.base_run)
            tdir.write_plan({"plan": plan, "base": base})
        todo = [t for t in trials if _key_json(t.key()) not in done]
        cost = _state_cost(model, train_ds, config, trials, todo, base, n_blocks, seq_len)
        fingerprint = base_fingerprint(model)
        rows: list[TrialResult] = []
        signal_name = None
        for trial in trials:
            if _key_json(trial.key()) in done:
                rows.append(
                    replace(done[_key_json(trial.key())], trial=trial.index)
                )  # numbered as in this grid
                log.info("tune %s: done in an earlier session, skipped", trial.name)
                continue
            row, model, signal_name = _run_trial(
                model,
                tokenizer,
                train_ds,
                scorer,
                config,
                trial,
                tdir,
                warmup,
                source,
                callbacks,
            )
            _check_base(model, fingerprint, trial)
            if signal_name is not None:
                break
            tdir.append_trial(row.to_dict())
            rows.append(row)
        chosen = choose(rows, base, budget) if signal_name is None else None
        result = TuneResult(
            output_dir=str(tdir.path),
            base=base,
            trials=rows,
            budget=budget,
            budget_tokens=n_blocks * seq_len,
            chosen=chosen,
            cost=cost,
            signal=signal_name,
            scored_on=scorer.scored_on,
        )
        if signal_name is None:
            _write_outputs(tdir, result, config, trials)
    return result


# ---------------------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------------------


def _run_trial(
    model: Any,
    tokenizer: Any,
    train_ds: Any,
    scorer: TrialScorer,
    config: RunConfig,
    trial: Trial,
    tdir: TuneDir,
    warmup_ratio: float,
    source: Any,
    callbacks: list[Any] | None,
) -> tuple[TrialResult, Any, str | None]:
    """Attach a fresh adapter, train it on the budget blocks, score it, take it off. Returns the row, the base
    model (unwrapped again) and the signal that stopped training, if any."""
    from transformers import set_seed

    from ..model.lora import apply_lora
    from .pretrain import continued_pretrain

    run = tdir.trial_run(trial.name)
    train_cfg = _trial_train_config(config, trial, str(run.path), warmup_ratio)
    log.info(
        "tune %s: learning_rate %g, r %d, alpha %g, %s tokens/step",
        trial.name,
        trial.learning_rate,
        trial.r,
        trial.alpha,
        f"{trial.tokens_per_step:,}",
    )
    set_seed(config.train.seed)  # the same LoRA init and data order in every trial
    peft_model = apply_lora(model, config.adapter.replace(r=trial.r, alpha=trial.alpha))
    row = TrialResult(trial.index, **trial.key(), status="done")
    signal_name = None
    t0 = time.time()
    try:
        res = continued_pretrain(
            peft_model,
            tokenizer,
            train_ds,
            train_cfg,
            eval_config=EvalConfig(enabled=False),
            callbacks=callbacks,
            model_source=source,
        )
        signal_name = res.signal
        if signal_name is None:
            scores = scorer.score_trial(
                peft_model, run.adapter_dir, run, step=res.steps, tokens=res.tokens_trained
            )
            row.steps, row.tokens, row.tokens_per_s = res.steps, res.tokens_trained, res.tokens_per_s
            row.train_loss, row.domain, row.general = res.final_loss, scores["domain"], scores["general"]
    except TrainingError as e:  # a diverged trial is a result of the search, not the end of it
        row.status, row.error = "failed", str(e).splitlines()[0]
        log.warning("tune %s failed: %s", trial.name, row.error)
    finally:
        model = peft_model.unload()  # the base layers back in place, peft_config gone
        del peft_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row.wall_s = time.time() - t0
    return row, model, signal_name


def _trial_train_config(config: RunConfig, trial: Trial, output_dir: str, warmup_ratio: float) -> Any:
    """The run's train section for one probe: one pass over the budget blocks, the trial's learning rate and
    accumulation, warmup as the run's fraction of its steps, no checkpoints or evaluation along the way."""
    t = config.train
    return t.replace(
        output_dir=output_dir,
        learning_rate=trial.learning_rate,
        gradient_accumulation_steps=trial.gradient_accumulation_steps,
        max_steps=None,
        epochs=1.0,
        max_tokens=None,
        warmup_steps=0,
        warmup_ratio=warmup_ratio,
        save_every=0,
        eval_every=0,
        resume_from=None,
        overwrite=True,  # a trial cut short in an earlier session starts again
    )


# ---------------------------------------------------------------------------------------------------------
# Base weights, plan, cost
# ---------------------------------------------------------------------------------------------------------


def base_fingerprint(model: Any) -> dict[str, str]:
    """sha256 of the bytes of every parameter and buffer of ``model`` (4-bit packed weights included), by name."""
    out = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        data = t.detach().data if hasattr(t, "data") else t
        if data.device.type == "meta":
            continue
        raw = data.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        out[name] = f"{data.dtype}:{tuple(data.shape)}:{hashlib.sha256(raw.tobytes()).hexdigest()}"
    return out


def _check_base(model: Any, before: dict[str, str], trial: Trial) -> None:
    now = base_fingerprint(model)
    changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
    if changed:
        raise TrainingError(
            f"tune {trial.name} changed the base model's weights ({len(changed)} tensors, e.g. {changed[:3]}): "
            "later trials would not start from the same base. This is a bug; please report it with your config"
        )


def _sha_of(ds: Any) -> str:
    ids = ds.with_format("numpy")[:]["input_ids"]
    return hashlib.sha256(ids.astype("int64").tobytes()).hexdigest()[:16]


def _plan(
    config: RunConfig,
    options: TuneConfig,
    source: Any,
    model: Any,
    train_ds: Any,
    eval_ds: Any,
    general: list[str],
    seq_len: int,
) -> dict[str, Any]:
    """What every trial shares; a rerun resumes only the same plan."""
    t, a, m = config.train, config.adapter, config.model
    name = source.name_or_path if source is not None else str(getattr(model.config, "_name_or_path", ""))
    return {
        "model": name,
        "quantization": m.quantization,
        "compute_dtype": source.compute_dtype if source is not None else str(model.dtype),
        "seq_len": seq_len,
        "budget_blocks": len(train_ds),
        "train_blocks_sha": _sha_of(train_ds),
        "eval_blocks_sha": _sha_of(eval_ds),
        "general_sha": hashlib.sha256("\x00".join(general).encode()).hexdigest()[:16],
        "max_eval_tokens": options.max_eval_tokens,
        "seed": t.seed,
        "batch_size": t.batch_size,
        "schedule": [t.scheduler, t.warmup_steps, t.warmup_ratio, t.min_lr_ratio, t.decay_ratio],
        "optimizer": [t.optimizer, t.weight_decay, t.max_grad_norm, t.precision],
        "adapter": [a.dropout, a.target_modules, a.use_rslora, a.use_dora, a.train_embeddings],
    }


def _key_json(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def _resume(
    tdir: TuneDir, plan: dict[str, Any], overwrite: bool
) -> tuple[dict[str, Any] | None, dict[str, TrialResult]]:
    """(the base's stored scores, finished trials by key) of an earlier tune with the same plan; (None, {})
    for a fresh one. Another plan is refused, naming what changed, unless ``overwrite``."""
    if overwrite:
        tdir.clear()
    stored = tdir.read_plan()
    if stored is None:
        if tdir.read_trials():
            tdir.clear()  # rows without a plan cannot be checked: start again
        return None, {}
    old = stored.get("plan") or {}
    changed = [k for k in sorted(set(old) | set(plan)) if old.get(k) != json.loads(json.dumps(plan.get(k)))]
    if changed:
        raise ConfigError(
            f"{tdir.path} holds trials of another plan ({', '.join(changed)} changed), which would not compare "
            "with new ones: rerun with --overwrite (tune overwrite=True) to discard them, or give another "
            "--output directory",
            header="cannot resume the tune",
        )
    done = {_key_json(TrialResult.from_dict(r).key): TrialResult.from_dict(r) for r in tdir.read_trials()}
    log.info("tune: resuming %s: %d finished trial(s) found", tdir.path, len(done))
    return stored.get("base"), done


def _state_cost(
    model: Any,
    train_ds: Any,
    config: RunConfig,
    trials: list[Trial],
    todo: list[Trial],
    base: dict[str, Any],
    n_blocks: int,
    seq_len: int,
) -> str:
    """Log what the tune costs before it starts: trials x budget tokens, and a time estimate from one measured
    micro-step (forward + backward on a throw-away adapter) and the base's measured evaluation time."""
    tokens = n_blocks * seq_len
    text = f"tune: {len(trials)} trials x {tokens:,} tokens = {len(trials) * tokens:,} training tokens" + (
        f" ({len(trials) - len(todo)} done already, {len(todo)} to run)" if len(todo) < len(trials) else ""
    )
    if todo:
        per_block = _measure_block_seconds(model, train_ds, config, todo[0])
        eval_s = sum(float((base.get(s) or {}).get("elapsed_s") or 0.0) for s in ("domain", "general"))
        estimate = len(todo) * (n_blocks * per_block + eval_s)
        text += (
            f"; estimated {estimate / 60:.1f} min ({seq_len / per_block:,.0f} tokens/s measured on one micro-step, "
            f"{eval_s:.1f} s of evaluation per trial)"
        )
    log.info("%s", text)
    return text


def _measure_block_seconds(model: Any, train_ds: Any, config: RunConfig, trial: Trial) -> float:
    """Seconds per training block: the second of two forward + backward passes on one micro-batch, with a
    throw-away adapter of the first trial's rank (the first pass pays one-time costs)."""
    from ..model.lora import apply_lora
    from ..model.loss import causal_lm_loss_sum
    from .trainer import collate_blocks

    batch = collate_blocks([train_ds[i] for i in range(min(config.train.batch_size, len(train_ds)))])
    peft_model = apply_lora(model, config.adapter.replace(r=trial.r, alpha=trial.alpha))
    try:
        device = next(p for p in peft_model.parameters() if p.requires_grad).device
        batch = {k: v.to(device) for k, v in batch.items()}
        peft_model.train()
        elapsed = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            loss, n = causal_lm_loss_sum(
                peft_model, batch["input_ids"], batch["labels"], batch.get("position_ids")
            )
            (loss / max(n, 1)).backward()
            elapsed = time.perf_counter() - t0
    finally:
        peft_model.unload()
        del peft_model
        gc.collect()
    return elapsed / len(batch["input_ids"])


def _write_outputs(tdir: TuneDir, result: TuneResult, config: RunConfig, trials: list[Trial]) -> None:
    """results.md, tune.png and (with a choice) chosen.yaml."""
    from .tune_report import format_results, plot_tune

    if result.chosen is not None:
        trial = next(t for t in trials if t.index == result.chosen)
        result.chosen_config = str(tdir.write_chosen(chosen_run_config(config, trial)))
    else:
        tdir.remove_chosen()
    plot = plot_tune(result, tdir.plot_path)
    result.plot_path = str(tdir.plot_path) if plot else None
    result.results_path = str(tdir.write_results(format_results(result)))
