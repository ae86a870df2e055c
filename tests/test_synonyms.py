"""Names people bring from HF TrainingArguments, Axolotl and LLaMA-Factory get lora_dapt's key in the error."""

from __future__ import annotations

import copy
import dataclasses
import doctest

import pytest

from lora_dapt.config import SECTIONS, RunConfig, TrainConfig
from lora_dapt.errors import ConfigError
from lora_dapt.synonyms import SECTION_SYNONYMS, SYNONYMS, normal_name

BASE = {"model": {"name_or_path": "m"}, "data": {"sources": ["a.txt"]}}

FIELDS = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


def problems(**sections) -> list[str]:
    """The problem lines of a config made of BASE plus ``sections`` (merged into BASE's sections)."""
    data = copy.deepcopy(BASE)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = value
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data)
    return err.value.problems


def test_the_table_points_at_real_keys_and_shadows_none_of_ours():
    for name, synonym in SYNONYMS.items():
        section, _, key = synonym.key.partition(".")
        assert key in FIELDS[section], f"{name} -> {synonym.key}: no such key"
        assert not any(name in keys for keys in FIELDS.values()), f"{name} is one of our own keys"
        assert name not in SECTIONS and name not in SECTION_SYNONYMS, name
        assert normal_name(name) == name, name
    for name, section in SECTION_SYNONYMS.items():
        assert section in SECTIONS and name not in SECTIONS


@pytest.mark.parametrize("name", sorted(SYNONYMS))
def test_every_synonym_is_suggested_in_its_section_another_section_and_at_the_top(name):
    synonym = SYNONYMS[name]
    section = synonym.key.partition(".")[0]
    other = "merge" if section != "merge" else "eval"
    value = f" = {synonym.value}" if synonym.value else ""
    got = problems(**{section: {name: 1}, other: {name: 1}, name: 1})
    assert sorted(got) == sorted(
        [
            f"{section}.{name}: unknown key; lora_dapt's key is {synonym.key}{value}",
            f"{other}.{name}: unknown key; lora_dapt's key is {synonym.key}{value}",
            f"{name}: unknown section; lora_dapt's key is {synonym.key}{value}, inside the {section} section",
        ]
    )


# The names of issue 19, with the key written out here (not read from the table).
NAMED = [
    ("per_device_train_batch_size", "train.batch_size"),
    ("num_train_epochs", "train.epochs"),
    ("logging_steps", "train.logging_every"),
    ("save_steps", "train.save_every"),
    ("eval_steps", "train.eval_every"),
    ("lr_scheduler_type", "train.scheduler"),
    ("lora_r", "adapter.r"),
    ("lora_alpha", "adapter.alpha"),
    ("lora_dropout", "adapter.dropout"),
    ("lora_target_modules", "adapter.target_modules"),
    ("sequence_len", "data.seq_len"),
    ("cutoff_len", "data.seq_len"),
    ("max_seq_length", "data.seq_len"),
    ("max_length", "data.seq_len"),
    ("micro_batch_size", "train.batch_size"),
    ("num_epochs", "train.epochs"),
    ("base_model", "model.name_or_path"),
    ("model_name_or_path", "model.name_or_path"),
    ("load_in_4bit", "model.quantization = nf4"),
    ("bf16", "train.precision = bf16"),
    ("fp16", "train.precision = fp16"),
    ("dataset", "data.sources"),
    ("datasets", "data.sources"),
    ("val_set_size", "data.eval_fraction"),
]


@pytest.mark.parametrize(("name", "ours"), NAMED)
def test_the_names_people_bring(name, ours):
    section = ours.partition(".")[0]
    assert problems(**{section: {name: 1}}) == [f"{section}.{name}: unknown key; lora_dapt's key is {ours}"]


def test_save_steps_no_longer_suggests_max_steps_and_typos_still_get_a_spelling():
    assert problems(train={"save_steps": 10, "lerning_rate": 1, "max_stepz": 3}) == [
        "train.save_steps: unknown key; lora_dapt's key is train.save_every",
        "train.lerning_rate: unknown key; did you mean 'learning_rate'?",
        "train.max_stepz: unknown key; did you mean 'max_steps'?",
    ]
    with pytest.raises(ConfigError) as err:  # a section on its own (as merge_adapter's keywords are checked)
        TrainConfig.from_dict({"save_steps": 10})
    assert err.value.problems == ["train.save_steps: unknown key; lora_dapt's key is train.save_every"]


def test_our_keys_in_the_wrong_section_or_at_the_top_level():
    assert sorted(
        problems(
            train={"r": 8},
            adapter={"warmup_ratio": 0.1, "learning_rate": 1e-4},
            model={"batch_size": 2},
            learning_rate=1e-4,
            gradient_accumulation_steps=4,
            output_dir="runs/x",
        )
    ) == sorted(
        [
            "adapter.warmup_ratio: unknown key; warmup_ratio is a key of the train section: train.warmup_ratio",
            "adapter.learning_rate: unknown key; learning_rate is a key of the train section: train.learning_rate",
            "model.batch_size: unknown key; batch_size is a key of the train and eval sections: train.batch_size, "
            "eval.batch_size",
            "train.r: unknown key; r is a key of the adapter section: adapter.r",
            "learning_rate: unknown section; learning_rate is a key of the train section: train.learning_rate",
            "gradient_accumulation_steps: unknown section; gradient_accumulation_steps is a key of the train "
            "section: train.gradient_accumulation_steps",
            "output_dir: unknown section; output_dir is a key of the train and merge sections: train.output_dir, "
            "merge.output_dir",
        ]
    )


def test_every_key_of_ours_at_the_top_level_names_its_section():
    for section, keys in FIELDS.items():
        for key in keys - set(SECTIONS):
            (line,) = problems(**{key: 1})
            assert line.startswith(f"{key}: unknown section; {key} is a key of the ")
            if section != "sft" or key not in FIELDS["train"]:
                assert f"{section}.{key}" in line, line


def test_an_axolotl_config_pasted_whole():
    axolotl = {
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "load_in_4bit": True,
        "adapter": "qlora",
        "lora_r": 16,
        "lora_target_linear": True,
        "sequence_len": 2048,
        "micro_batch_size": 2,
        "num_epochs": 1,
        "learning_rate": 2e-4,
    }
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(axolotl)
    assert err.value.problems == [
        "base_model: unknown section; lora_dapt's key is model.name_or_path, inside the model section",
        "load_in_4bit: unknown section; lora_dapt's key is model.quantization = nf4, inside the model section",
        "adapter = 'qlora': expected a mapping of adapter settings (Axolotl's `adapter: qlora` is "
        "model.quantization: nf4 here and `adapter: lora` is model.quantization: none; this section holds "
        "the LoRA settings: r, alpha, dropout, ...)",
        "lora_r: unknown section; lora_dapt's key is adapter.r, inside the adapter section",
        "lora_target_linear: unknown section; lora_dapt's key is adapter.target_modules = all-linear, inside "
        "the adapter section",
        "sequence_len: unknown section; lora_dapt's key is data.seq_len, inside the data section",
        "micro_batch_size: unknown section; lora_dapt's key is train.batch_size, inside the train section",
        "num_epochs: unknown section; lora_dapt's key is train.epochs, inside the train section",
        "learning_rate: unknown section; learning_rate is a key of the train section: train.learning_rate",
    ]


def test_sft_keeps_its_own_training_keys_and_other_spellings():
    assert sorted(
        problems(
            sft={"num_train_epochs": 2, "max_seq_length": 512, "per_device_eval_batch_size": 4},
            lora={"r": 8},
            train={"Per-Device-Train-Batch-Size": 2},
        )
    ) == sorted(
        [
            "train.Per-Device-Train-Batch-Size: unknown key; lora_dapt's key is train.batch_size",
            "sft.num_train_epochs: unknown key; lora_dapt's key is sft.epochs",
            "sft.max_seq_length: unknown key; lora_dapt's key is sft.seq_len",
            "sft.per_device_eval_batch_size: unknown key; lora_dapt's key is eval.batch_size",
            "lora: unknown section; lora_dapt calls this section 'adapter'",
        ]
    )


def test_the_docstring_examples_hold():
    from lora_dapt import _sections, synonyms

    for module in (synonyms, _sections):
        result = doctest.testmod(module)
        assert result.attempted >= 2 and result.failed == 0, module.__name__
