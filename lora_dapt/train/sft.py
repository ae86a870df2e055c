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

Data. Four row formats, detected per file from its first row (or forced with ``SFTConfig.format``) and
checked on every row; every malformed row is reported with its file and line number, all at once:

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ``prompt_completion``: ``{"prompt": "...", "completion": "..."}`` (or trl's conversational lists)
* ``alpaca``: ``{"instruction": "...", "input": "..." (optional), "output": "...", "system": (optional)}``
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``

Every format becomes a list of chat messages and is rendered with the tokenizer's chat template, so training
and inference see the same format. A tokenizer without a template (a base model) gets
:data:`DEFAULT_CHAT_TEMPLATE`, which is saved with the tokenizer in the run's ``adapter/`` (and so in the
merged model). It uses plain-text role headers, no new tokens, so the embeddings need not grow::

    <s>### System:\\nBe brief.\\n\\n### User:\\nWhat is a dose?\\n\\n### Assistant:\\nAn amount.</s>\\n\\n

Labels. Masking is by position, never by token id (pad may equal eos, trl #1623): assistant content and
the end-of-turn token after it are trained, every other token (BOS, system, user, role headers) is -100.
Templates with ``{% generation %}`` blocks (the default one) give the assistant positions directly
(``return_assistant_tokens_mask``). For other templates the conversation is rendered prefix by prefix: the
assistant turn ``i`` spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i+1])``; the whole conversation is tokenized once and a token is trained when its
characters overlap a span, so the labelled tokens are exactly the trained ones. A template that renders
earlier turns differently once later turns are added is reported, not guessed around. When the last
assistant turn does not end with EOS or another special token, EOS is appended and trained.

Packing. Conversations are packed with :func:`lora_dapt.packing.pack_documents`: ``position_ids`` restart at
every conversation and the model runs without an attention mask, so packed conversations never attend to
each other. Trade-off: conversations longer than ``seq_len`` are dropped (counted and reported with their
line numbers), never cut, because a cut conversation would train answers without their questions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import AdapterConfig, EvalConfig, MergeConfig, ModelConfig, RunConfig, SFTConfig, TrainConfig
from ..data.chat import chat_prompt, prepare_sft_data
from ..errors import ConfigError, ModelLoadError

log = logging.getLogger("lora_dapt")


@dataclass
class _Source:
    kind: str  # 'run' | 'model'
    path: str
    base: str = ""  # run: the base model the adapter was trained on
    gguf_file: str | None = None
    quantization: str | None = None  # run: as trained
    compute_dtype: str = "auto"


def is_run_dir(path: str | Path) -> bool:
    """True for a training run directory (DAPT or SFT): it holds ``adapter/adapter_config.json``."""
    return (Path(path) / "adapter" / "adapter_config.json").is_file()


def _resolve_source(model_or_run: str | Path) -> _Source:
    p = Path(model_or_run)
    if (p / "adapter_config.json").is_file() and is_run_dir(p.parent):
        raise ConfigError(
            f"model_or_run = {str(p)!r} is an adapter directory; pass its run directory {str(p.parent)!r}"
        )
    if not is_run_dir(p):
        return _Source("model", str(model_or_run))
    info_path = p / "run_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")).get("base_model") or {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{p} looks like a run directory but {info_path} is unreadable ({e})") from None
    name, resolved = info.get("name_or_path"), info.get("resolved")
    if not name:
        raise ModelLoadError(f"{info_path} records no base model (base_model.name_or_path)")
    base, gguf = name, info.get("gguf_file")
    if resolved and Path(resolved).is_dir() and not Path(name).exists():
        base, gguf = resolved, None  # the original moved; its resolved copy is still here (as merge_run does)
    quant = info.get("quantization")
    return _Source(
        "run",
        str(p),
        base=str(base),
        gguf_file=gguf,
        quantization=None if quant in (None, "none") else quant,
        compute_dtype=info.get("compute_dtype") or "auto",
    )


def _load_tokenizer_for(src: _Source, model_cfg: ModelConfig) -> Any:
    from ..model.load import load_tokenizer, resolve_model_source

    if src.kind == "run":
        adapter = Path(src.path) / "adapter"
        if any(
            (adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            return load_tokenizer(adapter, trust_remote_code=model_cfg.trust_remote_code)
        return load_tokenizer(
            resolve_model_source(src.base, src.gguf_file), trust_remote_code=model_cfg.trust_remote_code
        )
    source = resolve_model_source(src.path, model_cfg.gguf_file)
    return load_tokenizer(source, trust_remote_code=model_cfg.trust_remote_code)


def _merged_dir(run_dir: Path, merge_cfg: MergeConfig | None) -> Path:
    """RUN/merged, merged now (with ``merge_cfg``'s dtype, base_source, tolerance) unless a verified merge newer
    than the adapter is already there."""
    out = run_dir / "merged"
    report = out / "merge_report.json"
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    if report.is_file() and (out / "config.json").is_file():
        try:
            passed = json.loads(report.read_text(encoding="utf-8")).get("passed") is True
        except (OSError, ValueError):
            passed = False
        if passed and (not weights.is_file() or weights.stat().st_mtime <= report.stat().st_mtime):
            log.info("stack='merge': reusing the verified merge in %s", out)
            return out
    from ..export.merge import merge_run

    log.info("stack='merge': merging %s into its 16-bit base -> %s", run_dir / "adapter", out)
    kw: dict[str, Any] = {}
    if merge_cfg is not None:
        kw = {
            "dtype": merge_cfg.dtype,
            "base_source": merge_cfg.base_source,
            "tolerance": merge_cfg.tolerance,
        }
    return Path(merge_run(run_dir, output_dir=out, overwrite=True, **kw))


def _run_merge_config(run_dir: Path) -> MergeConfig:
    """The merge section of a run's config.yaml (defaults when absent), without its output_dir: an SFT run
    inherits how its DAPT run merges, never where to."""
    import yaml

    path = run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    section = data.get("merge") if isinstance(data, dict) else None
    return MergeConfig.from_dict(section or {}).replace(output_dir=None)


def _load_model(
    src: _Source,
    stack: str,
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    merge_cfg: MergeConfig | None,
    seed: int,
) -> tuple[Any, str, Any]:
    """(LoRA model ready to train, the base it sits on, that base's ModelSource)."""
    from transformers import set_seed

    from ..model.load import load_base_model
    from ..model.lora import apply_lora, load_adapter, prepare_for_training

    load_kw = {
        "double_quant": model_cfg.double_quant,
        "device": model_cfg.device,
        "trust_remote_code": model_cfg.trust_remote_code,
        "attn_implementation": model_cfg.attn_implementation,
    }
    quant = None if model_cfg.quantization == "none" else model_cfg.quantization
    if src.kind == "run" and stack == "continue":
        # the adapter continues on exactly the base it was trained on: same quantization and compute dtype
        loaded = load_base_model(
            src.base, src.quantization, src.compute_dtype, gguf_file=src.gguf_file, **load_kw
        )
        model, source = loaded.model, loaded.source
        model = prepare_for_training(model, gradient_checkpointing=adapter_cfg.gradient_checkpointing)
        model = load_adapter(model, Path(src.path) / "adapter", is_trainable=True)
        return model, src.base, source
    if src.kind == "run":  # stack == "merge"
        base, gguf = str(_merged_dir(Path(src.path), merge_cfg)), None
    else:
        base, gguf = src.path, model_cfg.gguf_file
    loaded = load_base_model(base, quant, model_cfg.compute_dtype, gguf_file=gguf, **load_kw)
    set_seed(seed)  # the LoRA init draws from the global generators
    return apply_lora(loaded.model, adapter_cfg), base, loaded.source


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
) -> Any:
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
    src = _resolve_source(model_or_run)
    if merge_config is None and src.kind == "run":
        merge_config = _run_merge_config(Path(src.path))
    tokenizer = _load_tokenizer_for(src, model_cfg)
    prepared = prepare_sft_data(data, tokenizer, cfg)
    log.info("SFT data ready: %s", prepared.stats.summary())
    model, base, source = _load_model(src, cfg.stack, model_cfg, adapter_cfg, merge_config, cfg.seed)
    model.config.use_cache = False  # packed blocks are kept apart only without a KV cache
    prepared.stats.source = {
        "model_or_run": str(model_or_run),
        "kind": src.kind,
        "stack": cfg.stack if src.kind == "run" else None,
        "base": base,
    }

    # -- the resolved config, saved as RUN/config.yaml ------------------------------------------------------
    if isinstance(data, (str, Path)):
        data = [data]
    files = [str(d) for d in data] if all(isinstance(d, (str, Path)) for d in data) else []
    cfg = cfg.replace(model_or_run=str(model_or_run), data=files)
    run_config = RunConfig(
        model=model_cfg.replace(
            name_or_path=base,
            quantization=source.quantization,
            gguf_file=src.gguf_file if src.kind == "run" and cfg.stack == "continue" else model_cfg.gguf_file,
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


_TRAIN_FIELDS = {f for f in TrainConfig.__dataclass_fields__ if not f.startswith("_")}


def sft_from_config(config: RunConfig) -> Any:
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
        if is_run_dir(config.train.output_dir):
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
