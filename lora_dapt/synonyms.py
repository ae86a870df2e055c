"""Other tools' names for lora_dapt's config keys: what a config error suggests for a name people bring.

Most users arrive with a Hugging Face ``TrainingArguments`` (or TRL / PEFT / bitsandbytes), Axolotl or
LLaMA-Factory config in their heads or on disk. An unknown key is answered, in this order, by:

1. :data:`SYNONYMS`, the one table of foreign names: ``num_train_epochs`` -> ``train.epochs``,
   ``lora_r`` -> ``adapter.r``, ``load_in_4bit`` -> ``model.quantization = nf4``;
2. our own key given in the wrong section, or at the top level as Axolotl and LLaMA-Factory configs are
   flat: ``train.r`` -> ``adapter.r``, a top-level ``learning_rate: 1e-4`` -> ``train.learning_rate``;
3. nothing: the caller (:func:`lora_dapt._sections.unknown_name`) falls back to a close spelling in the
   section (``lerning_rate`` -> ``learning_rate``) or lists the known keys.

A suggestion never renames a key silently: the config is still refused, and the message says what to
write. The table is checked against the config sections by ``tests/test_synonyms.py`` (every target
exists, no foreign name shadows one of ours).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["SECTION_SYNONYMS", "SYNONYMS", "Synonym", "not_a_mapping_hint", "suggest"]


@dataclass(frozen=True)
class Synonym:
    """Where a foreign key lives in lora_dapt's config."""

    key: str
    """Our key, ``section.name``."""
    value: str = ""
    """The value to write when it does not carry over as is (``load_in_4bit: true`` is ``nf4``)."""


SYNONYMS: Mapping[str, Synonym] = MappingProxyType(
    {
        # Hugging Face TrainingArguments (TRL's configs and LLaMA-Factory reuse these names)
        "per_device_train_batch_size": Synonym("train.batch_size"),
        "train_batch_size": Synonym("train.batch_size"),
        "per_device_eval_batch_size": Synonym("eval.batch_size"),
        "num_train_epochs": Synonym("train.epochs"),
        "logging_steps": Synonym("train.logging_every"),
        "save_steps": Synonym("train.save_every"),
        "eval_steps": Synonym("train.eval_every"),
        "save_strategy": Synonym("train.save_every", "a number of steps (0: only at the end)"),
        "eval_strategy": Synonym("train.eval_every", "a number of steps (0: only before and after)"),
        "evaluation_strategy": Synonym("train.eval_every", "a number of steps (0: only before and after)"),
        "lr_scheduler_type": Synonym("train.scheduler"),
        "lr": Synonym("train.learning_rate"),
        "optim": Synonym("train.optimizer"),
        "bf16": Synonym("train.precision", "bf16"),
        "fp16": Synonym("train.precision", "fp16"),
        "resume_from_checkpoint": Synonym("train.resume_from", "latest, or a checkpoint directory"),
        "overwrite_output_dir": Synonym("train.overwrite"),
        "dataloader_num_workers": Synonym("train.num_workers"),
        "model_name_or_path": Synonym("model.name_or_path"),
        "model_name": Synonym("model.name_or_path"),
        "model_id": Synonym("model.name_or_path"),
        "torch_dtype": Synonym("model.compute_dtype"),
        # transformers' run_clm.py example and TRL's SFTConfig
        "block_size": Synonym("data.seq_len"),
        "max_seq_length": Synonym("data.seq_len"),
        "max_length": Synonym("data.seq_len"),
        "train_file": Synonym("data.sources"),
        "dataset_name": Synonym("data.sources", "local files, globs or directories"),
        "validation_file": Synonym("data.eval_sources"),
        "validation_split_percentage": Synonym("data.eval_fraction", "a fraction: 5 percent is 0.05"),
        "dataset_text_field": Synonym("data.text_field"),
        "text_column": Synonym("data.text_field"),
        # PEFT's LoraConfig and bitsandbytes' BitsAndBytesConfig
        "lora_alpha": Synonym("adapter.alpha"),
        "lora_dropout": Synonym("adapter.dropout"),
        "modules_to_save": Synonym("adapter.train_embeddings", "true (embeddings and output head in full)"),
        "use_gradient_checkpointing": Synonym("adapter.gradient_checkpointing"),
        "load_in_4bit": Synonym("model.quantization", "nf4"),
        "load_in_8bit": Synonym("model.quantization", "int8"),
        "bnb_4bit_quant_type": Synonym("model.quantization"),
        "bnb_4bit_compute_dtype": Synonym("model.compute_dtype"),
        "bnb_4bit_use_double_quant": Synonym("model.double_quant"),
        # Axolotl (flat configs)
        "base_model": Synonym("model.name_or_path"),
        "sequence_len": Synonym("data.seq_len"),
        "micro_batch_size": Synonym("train.batch_size"),
        "eval_batch_size": Synonym("eval.batch_size"),
        "num_epochs": Synonym("train.epochs"),
        "lr_scheduler": Synonym("train.scheduler"),
        "cosine_min_lr_ratio": Synonym("train.min_lr_ratio"),
        "lora_r": Synonym("adapter.r"),
        "lora_target_modules": Synonym("adapter.target_modules"),
        "lora_target_linear": Synonym("adapter.target_modules", "all-linear"),
        "lora_modules_to_save": Synonym(
            "adapter.train_embeddings", "true (embeddings and output head in full)"
        ),
        "peft_use_dora": Synonym("adapter.use_dora"),
        "peft_use_rslora": Synonym("adapter.use_rslora"),
        "datasets": Synonym("data.sources"),
        "test_datasets": Synonym("data.eval_sources"),
        "val_set_size": Synonym("data.eval_fraction"),
        "dataset_prepared_path": Synonym("data.cache_dir"),
        "dataset_processes": Synonym("data.num_proc"),
        "flash_attention": Synonym("model.attn_implementation", "flash_attention_2"),
        "sdp_attention": Synonym("model.attn_implementation", "sdpa"),
        # LLaMA-Factory
        "lora_rank": Synonym("adapter.r"),
        "rank": Synonym("adapter.r"),
        "lora_target": Synonym("adapter.target_modules", "all-linear, or a list of module names"),
        "additional_target": Synonym("adapter.train_embeddings", "true (embeddings and output head in full)"),
        "cutoff_len": Synonym("data.seq_len"),
        "dataset": Synonym("data.sources"),
        "val_size": Synonym("data.eval_fraction"),
        "quantization_bit": Synonym("model.quantization", "nf4 (4 bits) or int8 (8 bits)"),
        "preprocessing_num_workers": Synonym("data.num_proc"),
        "flash_attn": Synonym("model.attn_implementation", "flash_attention_2 or sdpa"),
    }
)
"""Foreign key name (lower case, ``_`` for ``-``) -> where it lives here. Names that are also one of our own
keys are not listed: those are found in the config sections themselves (rule 2 of the module docstring)."""


SECTION_SYNONYMS: Mapping[str, str] = MappingProxyType(
    {
        "lora": "adapter",
        "lora_config": "adapter",
        "peft": "adapter",
        "peft_config": "adapter",
        "training": "train",
        "trainer": "train",
        "training_args": "train",
        "training_arguments": "train",
        "evaluation": "eval",
    }
)
"""Other names of a config section -> ours."""


_NOT_A_MAPPING = MappingProxyType(
    {
        "adapter": "Axolotl's `adapter: qlora` is model.quantization: nf4 here and `adapter: lora` is "
        "model.quantization: none; this section holds the LoRA settings: r, alpha, dropout, ...",
    }
)


# Sections whose fields mean what the same-named field of another section means: SFTConfig extends
# TrainConfig and has its own seq_len / eval_fraction, so `sft.num_train_epochs` is `sft.epochs`.
_SAME_MEANING = MappingProxyType({"sft": ("train", "data")})


def normal_name(key: object) -> str:
    """A key as the tables spell it: lower case, ``-`` as ``_`` (``--per-device-train-batch-size`` too).

    >>> normal_name("Per-Device-Train-Batch-Size")
    'per_device_train_batch_size'
    """
    return str(key).strip().lstrip("-").lower().replace("-", "_")


def _section_fields() -> dict[str, list[str]]:
    # lora_dapt.config imports lora_dapt._sections, which imports this module: read the sections when asked
    from .config import SECTIONS

    return {
        name: [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        for name, cls in SECTIONS.items()
    }


def suggest(key: object, section: str) -> str | None:
    """What to say about unknown ``key`` met in ``section`` ('' for the top level of a config), or None.

    >>> suggest("num_train_epochs", "train")
    "lora_dapt's key is train.epochs"
    >>> suggest("lora_r", "")
    "lora_dapt's key is adapter.r, inside the adapter section"
    >>> suggest("r", "train")
    'r is a key of the adapter section: adapter.r'
    >>> suggest("lerning_rate", "train") is None
    True
    """
    name = normal_name(key)
    fields = _section_fields()
    if not section and name in SECTION_SYNONYMS:
        return f"lora_dapt calls this section '{SECTION_SYNONYMS[name]}'"
    synonym = SYNONYMS.get(name)
    if synonym is not None:
        target = _in_section(synonym.key, section, fields)
        text = f"lora_dapt's key is {target}" + (f" = {synonym.value}" if synonym.value else "")
        if not section:
            text += f", inside the {target.partition('.')[0]} section"
        return text
    homes = [s for s, names in fields.items() if name in names and s != section]
    if "train" in homes and "sft" in homes:
        homes.remove("sft")  # the sft section repeats every training key; train is where it belongs
    if not homes:
        return None
    where = " and ".join(homes)
    plural = "s" if len(homes) > 1 else ""
    return f"{name} is a key of the {where} section{plural}: {', '.join(f'{s}.{name}' for s in homes)}"


def _in_section(target: str, section: str, fields: Mapping[str, list[str]]) -> str:
    """``target`` (section.name), or the same field of ``section`` when it means the same there."""
    target_section, _, name = target.partition(".")
    if target_section in _SAME_MEANING.get(section, ()) and name in fields.get(section, ()):
        return f"{section}.{name}"
    return target


def not_a_mapping_hint(section: str) -> str:
    """A hint for a section given a plain value (Axolotl's ``adapter: qlora``), or ''."""
    hint = _NOT_A_MAPPING.get(section)
    return f" ({hint})" if hint else ""
