"""Instruction tuning (SFT) after continued pre-training, in one call: :func:`sft`.

Reads top to bottom: resolve what to tune (a DAPT run directory, a merged model, a base model) -> tokenizer
and chat template -> instruction data (read, validate, tokenize with assistant-only labels, pack, split) ->
model (continue the DAPT adapter, or merge it and train a fresh one) -> fit and evaluate -> save.

Why this is built on :func:`lora_dapt.train.continued_pretrain` and not on trl's ``SFTTrainer``: an SFT run is
then the same kind of run as a DAPT run: the same run directory (config.yaml, metrics.jsonl, adapter/ with the
tokenizer, completion-marked checkpoints and resume, summary.json, report), the same before/after evaluation
and the same chunked loss. TRL's default chunked loss swaps ``model.forward`` and refuses PEFT on ``lm_head``,
which a DAPT adapter with trained embeddings has (STYLE.md). trl is used for what it is good at here: its
data helpers (``is_conversational``, ``maybe_convert_to_chatml``).

The data side (row formats, chat templates, assistant-only labels by position, packing conversations
without cross-attention) is :func:`lora_dapt.data.chat.prepare_sft_data`; see that module's docstring.
A DAPT run is read back through :class:`~lora_dapt.rundir.RunDir`: the base its adapter was trained on
(run info), its merge settings (``config.yaml``) and its verified merge (``merged/``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import AdapterConfig, EvalConfig, MergeConfig, ModelConfig, RunConfig, SFTConfig, TrainConfig
from ..data.chat import chat_prompt, prepare_sft_data
from ..errors import ConfigError, ModelLoadError
from ..model.load import ModelSource
from ..rundir import RunDir

if TYPE_CHECKING:
    from .pretrain import TrainResult

log = logging.getLogger("lora_dapt")

_TRAIN_FIELDS = {f for f in TrainConfig.__dataclass_fields__ if not f.startswith("_")}
"""The keys of an SFTConfig that the train section of config.yaml knows."""


def _open_dapt_run(model_or_run: str | Path) -> RunDir | None:
    """The run directory ``model_or_run`` names; None when it names a model (directory, .gguf, hub id)."""
    run_dir = RunDir.run_of_adapter(model_or_run)
    if run_dir is not None:
        raise ConfigError(
            f"model_or_run = {str(model_or_run)!r} is an adapter directory; pass its run directory {str(run_dir)!r}"
        )
    return RunDir.open(model_or_run) if RunDir.is_run(model_or_run) else None


def _trained_on(run: RunDir) -> ModelSource:
    """The base model the run's adapter was trained on, as recorded in its run info."""
    source = run.read_run_info()
    if source is None:
        raise ModelLoadError(
            f"{run.path} looks like a run directory but {run.run_info_path} is missing or records no base "
            "model (base_model.name_or_path); it was not written by lora_dapt's training"
        )
    return source


def _load_tokenizer_for(run: RunDir | None, model_or_run: str | Path, model_cfg: ModelConfig) -> Any:
    """A run's tokenizer is the one saved beside its adapter (it may carry a chat template), else its base's;
    a model's is its own."""
    from ..model.load import load_tokenizer, resolve_model_source

    trust = model_cfg.trust_remote_code
    if run is None:
        return load_tokenizer(
            resolve_model_source(model_or_run, model_cfg.gguf_file), trust_remote_code=trust
        )
    if run.has_adapter_tokenizer():
        return load_tokenizer(run.adapter_dir, trust_remote_code=trust)
    return load_tokenizer(resolve_model_source(*_trained_on(run).loadable()), trust_remote_code=trust)


def _merged_dir(run: RunDir, merge_cfg: MergeConfig | None) -> Path:
    """RUN/merged, merged now (with ``merge_cfg``'s dtype, base_source, tolerance) unless a verified merge
    newer than the adapter is already there."""
    if run.has_current_merge():
        log.info("stack='merge': reusing the verified merge in %s", run.merged_dir)
        return run.merged_dir
    from ..export.merge import merge_run

    log.info("stack='merge': merging %s into its 16-bit base -> %s", run.adapter_dir, run.merged_dir)
    kw: dict[str, Any] = {}
    if merge_cfg is not None:
        kw = {
            "dtype": merge_cfg.dtype,
            "base_source": merge_cfg.base_source,
            "tolerance": merge_cfg.tolerance,
        }
    return Path(merge_run(run.path, output_dir=run.merged_dir, overwrite=True, **kw))


def _load_model(
    model_or_run: str | Path,
    run: RunDir | None,
    stack: str,
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    merge_cfg: MergeConfig | None,
    seed: int,
    step_shape: tuple[int, int],
) -> tuple[Any, str, ModelSource]:
    """(LoRA model ready to train, the base it sits on, that base's ModelSource). ``step_shape`` is
    (seq_len, batch_size), for ``adapter.gradient_checkpointing='auto'``."""
    from transformers import set_seed

    from ..model.load import load_base_model_from
    from ..model.lora import apply_lora, load_adapter, prepare_for_training
    from ..planning.checkpointing import choose_gradient_checkpointing

    if run is not None and stack == "continue":
        # the adapter continues on exactly the base it was trained on: same quantization and compute dtype
        trained_on = _trained_on(run)
        base, gguf = trained_on.loadable()
        loaded = load_base_model_from(
            model_cfg,
            name_or_path=base,
            gguf_file=gguf,
            quantization=trained_on.quantization if trained_on.quantized else None,
            compute_dtype=trained_on.compute_dtype,
        )
        seq_len, batch_size = step_shape
        choice = choose_gradient_checkpointing(
            loaded.model, adapter_cfg, seq_len=seq_len, batch_size=batch_size
        )
        log.info("%s", choice.reason)
        model = prepare_for_training(loaded.model, gradient_checkpointing=choice.enabled)
        return load_adapter(model, run.adapter_dir, is_trainable=True), base, loaded.source
    if run is not None:  # stack == "merge"
        base = str(_merged_dir(run, merge_cfg))
        loaded = load_base_model_from(model_cfg, name_or_path=base, gguf_file=None)
    else:
        base = str(model_or_run)
        loaded = load_base_model_from(model_cfg, name_or_path=base)
    set_seed(seed)  # the LoRA init draws from the global generators
    seq_len, batch_size = step_shape
    return apply_lora(loaded.model, adapter_cfg, seq_len=seq_len, batch_size=batch_size), base, loaded.source


def sft(
    model_or_run: str | Path,
    data: str | Path | Sequence[str | Path] | Sequence[dict[str, Any]] | None = None,
    config: SFTConfig | None = None,
    *,
    model_config: ModelConfig | None = None,
    adapter_config: AdapterConfig | None = None,
    eval_config: EvalConfig | None = None,
    merge_config: MergeConfig | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Instruction-tune a DAPT result (or any causal LM) with LoRA; returns a :class:`~lora_dapt.train.TrainResult`.

    Args:
        model_or_run: a DAPT run directory (``stack`` decides: 'continue' its adapter on the same quantized
            base, or 'merge' it into the 16-bit base, re-quantize and train a fresh adapter), a merged model
            directory, or a base model (directory, .gguf, hub id).
        data: instruction rows: .jsonl/.json files, globs, directories, a list of dicts or a Dataset
            (default: ``config.data``). Formats: see the module docstring.
        config: SFT and training settings; ``config.output_dir`` becomes the run directory (DAPT layout).
        model_config: how to load a model (quantization, compute dtype, device); its ``name_or_path`` is not
            used. A continued run adapter always uses the quantization it was trained with.
        adapter_config: the fresh adapter (model directories and ``stack='merge'``); for 'continue' only its
            ``gradient_checkpointing`` is used (rank etc. are the DAPT adapter's, embeddings it trained stay
            trained).
        eval_config: held-out and general-text evaluation; ``prompts`` are chat-formatted before generating.
        merge_config: how ``stack='merge'`` merges the DAPT adapter (dtype, base_source, tolerance); saved in
            config.yaml, so ``lora-dapt merge`` of the SFT run uses it too. None: the DAPT run's own merge
            settings (its output_dir excluded), or the defaults for a model directory.
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Example::

        result = sft("runs/dapt", "chat.jsonl", SFTConfig(output_dir="runs/sft", max_steps=500))
        # then: lora-dapt merge runs/sft
    """
    cfg = config or SFTConfig()
    model_cfg = model_config or ModelConfig()
    adapter_cfg = adapter_config or AdapterConfig()
    eval_cfg = eval_config or EvalConfig()
    data = data if data is not None else cfg.data
    if not data:
        raise ConfigError("sft.data: empty; give the instruction files (.jsonl/.json) to train on")

    # -- setup: source, tokenizer and data first (bad data fails before the slow model load) --------------
    run = _open_dapt_run(model_or_run)
    if merge_config is None and run is not None:
        # an SFT run inherits how its DAPT run merges, never where to
        merge_config = run.read_section("merge", MergeConfig).replace(output_dir=None)
    tokenizer = _load_tokenizer_for(run, model_or_run, model_cfg)
    prepared = prepare_sft_data(data, tokenizer, cfg)
    log.info("SFT data ready: %s", prepared.stats.summary())
    model, base, source = _load_model(
        model_or_run,
        run,
        cfg.stack,
        model_cfg,
        adapter_cfg,
        merge_config,
        cfg.seed,
        (cfg.seq_len, cfg.batch_size),
    )
    model.config.use_cache = False  # packed blocks are kept apart only without a KV cache
    prepared.stats.source = {
        "model_or_run": str(model_or_run),
        "kind": "model" if run is None else "run",
        "stack": cfg.stack if run is not None else None,
        "base": base,
    }
    continued = run is not None and cfg.stack == "continue"

    # -- the resolved config, saved as RUN/config.yaml ------------------------------------------------------
    if isinstance(data, (str, Path)):
        data = [data]
    files = [str(d) for d in data] if all(isinstance(d, (str, Path)) for d in data) else []
    cfg = cfg.replace(model_or_run=str(model_or_run), data=files)
    run_config = RunConfig(
        model=model_cfg.replace(
            name_or_path=base,
            quantization=source.quantization,
            gguf_file=source.gguf_file if continued else model_cfg.gguf_file,
        ),
        adapter=adapter_cfg,
        train=TrainConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k in _TRAIN_FIELDS}),
        eval=eval_cfg,
        merge=merge_config or MergeConfig(),
        sft=cfg,
    )
    if eval_cfg.prompts:  # samples are generated from chat-formatted prompts, as the model will be used
        eval_cfg = eval_cfg.replace(prompts=[chat_prompt(tokenizer, p) for p in eval_cfg.prompts])

    # -- fit, evaluate, save (the DAPT engine) ---------------------------------------------------------------
    from .pretrain import continued_pretrain

    return continued_pretrain(
        model,
        tokenizer,
        prepared,
        cfg,
        eval_config=eval_cfg,
        run_config=run_config,
        callbacks=callbacks,
        model_source=source,
    )


def sft_from_config(config: RunConfig) -> TrainResult:
    """Run SFT as described by a RunConfig's ``sft`` section; what ``lora-dapt sft CONFIG.yaml`` calls.

    ``sft.model_or_run`` says what to tune; when null, it is the DAPT run of the same file (``train.output_dir``),
    which must be finished. ``model`` gives the loading options (quantization, compute dtype, device),
    ``adapter`` the fresh adapter (model directories, ``stack: merge``), ``eval`` the evaluation and samples,
    ``merge`` how ``stack: merge`` merges the DAPT adapter (and later ``lora-dapt merge`` of the SFT run).
    Load the YAML with ``RunConfig.from_yaml(path, overrides, check=False)``: an SFT-only file has no
    ``data.sources``.

    Example::

        sft_from_config(RunConfig.from_yaml("examples/sft.yaml", check=False))
    """
    s = config.sft
    if s is None:
        raise ConfigError(
            "sft: missing section; add one, e.g. sft: {data: [chat.jsonl], output_dir: runs/sft, max_steps: 200}"
        )
    problems = []
    if not s.data:
        problems.append("sft.data: empty; list the instruction files (.jsonl/.json) to train on")
    source = s.model_or_run
    if source is None:
        if RunDir.is_run(config.train.output_dir):
            source = config.train.output_dir
            log.info("sft.model_or_run not set: tuning the DAPT run of this config, %s", source)
        else:
            problems.append(
                f"sft.model_or_run: not set, and train.output_dir = {config.train.output_dir!r} is not a finished "
                "DAPT run (no adapter/adapter_config.json). Run `lora-dapt train CONFIG.yaml` first, or set "
                "sft.model_or_run to a DAPT run directory, a merged model directory or a base model"
            )
    if problems:
        raise ConfigError(problems)
    return sft(
        source,
        s.data,
        s,
        model_config=config.model,
        adapter_config=config.adapter,
        eval_config=config.eval,
        merge_config=config.merge,
    )
