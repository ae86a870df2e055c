"""A merge before any weights are loaded: its settings, the checked adapter and base, the held-out text.

:func:`merge_settings` and :func:`trained_settings` turn merge_adapter's arguments into a MergeConfig and a
ModelConfig (every problem a ConfigError); :func:`prepare_job` runs the checks of :mod:`.checks` and returns a
:class:`MergeJob`, what the later steps of the merge (score, merge, verify, report) share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import MergeConfig, ModelConfig
from ..errors import ConfigError, MergeError
from ..model.load import (
    DTYPES,
    ModelSource,
    load_tokenizer,
    resolve_device,
    resolve_model_source,
)
from ..model.tokenizer import has_tokenizer_files
from .card import source_name
from .checks import (
    AdapterFiles,
    check_base_name,
    check_disk_space,
    check_shapes,
    check_tokenizer,
    count_weights,
    meta_model,
    read_adapter,
)
from .measure import FALLBACK_TEXTS, dtype_candidates, eval_sequences, model_dtype

log = logging.getLogger("lora_dapt")

DTYPE_BYTES = {name: torch.finfo(dtype).bits // 8 for name, dtype in DTYPES.items()}
"""Bytes per weight of each merge dtype."""


@dataclass
class MergeJob:
    """What the checks established: everything the later steps need, nothing loaded but the tokenizer."""

    base: str
    base_name: str
    """The base as the user named it (a .gguf file's path for a GGUF base): what the model card names."""
    source: Path | str
    """What ``from_pretrained`` loads (for a GGUF, lora_dapt's dequantized checkpoint)."""
    adapter_dir: Path
    adapter: AdapterFiles
    tokenizer: Any
    new_vocab: int | None
    """Vocabulary size of an adapter that grew the embeddings (an SFT run that added tokens), else None."""
    device: torch.device
    base_dtype: str
    """The dtype the base's checkpoint is stored in (its config's torch_dtype), what 'auto' tries first."""
    weight_count: int
    """Parameters of the merged model as saved (tied ones once, grown embeddings included), for disk checks."""
    big: bool
    """Over 1 GiB of weights: worth a full garbage collection after each model is freed."""
    trust_remote_code: bool
    notes: list[str] = field(default_factory=list)
    """Problems and warnings for the report."""
    sequences: list[torch.Tensor] = field(default_factory=list)
    """The held-out token sequences every model is scored on."""
    eval_source: str = ""


def merge_settings(config: MergeConfig | None, overrides: dict[str, Any]) -> MergeConfig:
    """``config`` with ``overrides`` applied, checked by MergeConfig (unknown keys named)."""
    if config is not None and not isinstance(config, MergeConfig):
        raise ConfigError(
            f"config = {config!r}: expected a MergeConfig (pass settings by name, e.g. dtype='float32')",
            header="cannot merge",
        )
    if not overrides:
        return config or MergeConfig()
    try:
        return MergeConfig.from_dict({**(config or MergeConfig()).to_dict(), **overrides})
    except ConfigError as e:
        raise ConfigError(e.problems, header="cannot merge") from None


def trained_settings(base: str | Path, trained_on: ModelSource | ModelConfig | None) -> ModelConfig:
    """How ``base`` was loaded in training, as a ``model`` section naming ``base``.

    A gguf_file applies only when ``trained_on`` names ``base`` (or names nothing): a run whose GGUF
    original moved away is merged from its dequantized copy (``ModelSource.loadable``), which needs none.
    """
    if trained_on is None:
        return ModelConfig(name_or_path=str(base))
    if isinstance(trained_on, ModelSource):
        trained = ModelConfig(
            name_or_path=trained_on.name_or_path,
            gguf_file=trained_on.gguf_file,
            quantization=trained_on.quantization,
            compute_dtype=trained_on.compute_dtype,
        )
    elif isinstance(trained_on, ModelConfig):
        trained = trained_on
    else:
        raise ConfigError(
            f"trained_on = {trained_on!r}: expected a ModelSource (loaded.source) or a ModelConfig",
            header="cannot merge",
        )
    same_model = not trained.name_or_path or Path(str(trained.name_or_path)) == Path(str(base))
    return trained.replace(name_or_path=str(base), gguf_file=trained.gguf_file if same_model else None)


def check_settings(cfg: MergeConfig, trained: ModelConfig) -> None:
    """ConfigError for settings that are fine alone but not together."""
    if cfg.base_source == "dequantized" and trained.quantization == "none":
        raise ConfigError(
            "base_source = 'dequantized' needs the quantization the adapter was trained with "
            "(trained_on=ModelSource or ModelConfig with quantization 'nf4', 'fp4' or 'int8')",
            header="cannot merge",
        )


def prepare_job(
    base: str | Path,
    adapter_dir: Path,
    out: Path,
    cfg: MergeConfig,
    trained: ModelConfig,
    tmp: str,
    base_name: str | None = None,
) -> MergeJob:
    """Everything that can be checked before any weights are loaded: the adapter's files and shapes against
    the base's (on the meta device), disk space, the tokenizer. ``base_name``: the base as the user named it in
    training (:func:`~lora_dapt.export.card.source_name`), when it differs from ``base``."""
    device = resolve_device(trained.device)
    source = resolve_model_source(base, trained.gguf_file)
    adapter = read_adapter(adapter_dir, staging_dir=tmp)
    base_config, meta = meta_model(source, trained.trust_remote_code)
    names = [
        str(source),
        source_name(trained.name_or_path, trained.gguf_file),
        *([base_name] if base_name else []),
    ]
    notes = check_base_name(adapter, adapter_dir, str(base), base_config, names)
    new_vocab = check_shapes(adapter, adapter_dir, str(base), meta)
    base_dtype = model_dtype(base_config)
    first = dtype_candidates(cfg.dtype, base_dtype)[0]
    count = count_weights(meta, new_vocab)
    del meta
    check_disk_space(out, count * DTYPE_BYTES[first], first)
    tokenizer = tokenizer_for(adapter_dir, source, trained.trust_remote_code)
    if new_vocab is None and adapter.config.get("trainable_token_indices"):  # rows grown for new tokens
        from ..model.vocab import padded_rows

        grown = padded_rows(len(tokenizer), base_config.vocab_size)
        new_vocab = grown if grown > base_config.vocab_size else None
    check_tokenizer(tokenizer, new_vocab, str(base), base_config.vocab_size)
    return MergeJob(
        base=str(base),
        base_name=base_name or source_name(trained.name_or_path, trained.gguf_file),
        source=source,
        adapter_dir=adapter_dir,
        adapter=adapter,
        tokenizer=tokenizer,
        new_vocab=new_vocab,
        device=device,
        base_dtype=base_dtype,
        weight_count=count,
        big=count * DTYPE_BYTES[first] > 2**30,
        trust_remote_code=trained.trust_remote_code,
        notes=notes,
    )


def tokenizer_for(adapter_dir: Path, source: str | Path, trust_remote_code: bool) -> Any:
    """The tokenizer saved with the adapter (training saves it there; SFT may have changed it), else the base's."""
    if has_tokenizer_files(adapter_dir):
        return load_tokenizer(adapter_dir, trust_remote_code=trust_remote_code)
    return load_tokenizer(source, trust_remote_code=trust_remote_code)


def held_out_sequences(
    tokenizer: Any, texts: Sequence[str] | None, source: str | None, max_tokens: int, max_len: int
) -> tuple[list[torch.Tensor], str]:
    """(token sequences to score, how to describe them): the given texts, else the generic fallback."""
    if not texts:
        source = "built-in generic sentences (no held-out texts given)"
        log.warning(
            "merge check uses generic sentences: pass eval_texts (the run's eval split) for domain numbers"
        )
    sequences = eval_sequences(tokenizer, list(texts) if texts else list(FALLBACK_TEXTS), max_tokens, max_len)
    if not sequences:
        raise MergeError("the held-out texts are empty after tokenization; give longer eval_texts")
    return sequences, source or "given texts"
