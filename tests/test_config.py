"""Config: defaults, YAML round trip, overrides, and one error listing every problem."""

from __future__ import annotations

import dataclasses

import pytest

from lora_dapt.config import (
    SECTIONS,
    AdapterConfig,
    DataConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
    apply_overrides,
    describe_config,
    field_docs,
)
from lora_dapt.errors import ConfigError


def _valid() -> dict:
    return {"model": {"name_or_path": "models/x"}, "data": {"sources": ["docs/*.txt"]}}


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig.from_dict({**_valid(), "adapter": {"r": 8, "target_modules": ["q_proj", "v_proj"]}})
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    again = RunConfig.from_yaml(path)
    assert again == cfg
    assert again.adapter.target_modules == ["q_proj", "v_proj"]
    assert again.adapter.r == 8


def test_yaml_scientific_notation_string_becomes_float(tmp_path):
    # YAML 1.1 reads "1e-4" (no dot) as a string; users write it all the time.
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {sources: [a.txt]}\ntrain: {learning_rate: 1e-4}\n")
    assert RunConfig.from_yaml(path).train.learning_rate == pytest.approx(1e-4)


def test_every_problem_listed_at_once():
    data = {
        **_valid(),
        "adapter": {"r": 0, "alpah": 16},
        "data": {"sources": ["x"], "seq_len": 1},
        "train": {"learning_rate": -1, "lerning_rate": 3, "warmup_steps": 50, "max_steps": 10},
        "bogus": {},
    }
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data)
    msg = str(err.value)
    assert "adapter.r = 0: must be > 0" in msg
    assert "adapter.alpah: unknown key; did you mean 'alpha'?" in msg
    assert "data.seq_len = 1: must be >= 2" in msg
    assert "train.learning_rate = -1.0: must be > 0" in msg
    assert "train.lerning_rate: unknown key; did you mean 'learning_rate'?" in msg
    assert "train.warmup_steps = 50: more than max_steps (10)" in msg
    assert "bogus: unknown section" in msg
    assert len(err.value.problems) == 7


def test_wrong_types_named():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({**_valid(), "adapter": {"r": "sixteen", "use_dora": "yes"}})
    msg = str(err.value)
    assert "adapter.r = 'sixteen': expected int" in msg
    assert "adapter.use_dora = 'yes': expected bool" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"train.scheduler = 'cosin': expected 'cosine' \| 'linear'"):
        TrainConfig(scheduler="cosin")


def test_direct_construction_checks_too():
    with pytest.raises(ConfigError, match="adapter.dropout = 1.5"):
        AdapterConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="needs data.replay_sources"):
        DataConfig(replay_fraction=0.2)


def test_missing_model_and_sources():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({})
    assert "model.name_or_path: missing" in str(err.value)
    assert "data.sources: empty" in str(err.value)


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    RunConfig.from_dict(_valid()).to_yaml(path)
    cfg = RunConfig.from_yaml(
        path, ["train.learning_rate=3e-4", "adapter.r=64", "adapter.target_modules=[q_proj]"]
    )
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.adapter.r == 64
    assert cfg.adapter.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["learning_rate=1"])
    with pytest.raises(ConfigError, match="train.max_stepz: unknown key; did you mean 'max_steps'"):
        RunConfig.from_yaml(path, ["train.max_stepz=3"])


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(bad)
    # safe_load: Python object tags are refused, never constructed
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(evil)


def test_sft_config_shares_train_field_names():
    train_fields = set(TrainConfig.__dataclass_fields__)
    sft_fields = set(SFTConfig.__dataclass_fields__)
    assert train_fields <= sft_fields
    assert SFTConfig().output_dir == "runs/sft"
    # SFT's own defaults; TrainConfig's stay
    assert (SFTConfig().learning_rate, TrainConfig().learning_rate) == (1e-4, 5e-4)
    assert TrainConfig().output_dir == "runs/dapt"
    # the shared fields keep TrainConfig's order, so YAML keys come out in the same order in both sections
    assert list(SFTConfig().to_dict())[: len(train_fields)] == list(TrainConfig().to_dict())
    # inherited fields keep TrainConfig's docs; the redeclared output_dir and learning_rate have their own
    sft, train = field_docs(SFTConfig), field_docs(TrainConfig)
    assert train["learning_rate"].startswith("Peak learning rate of the LoRA weights. 5e-4")
    assert (
        sft["learning_rate"]
        == "Peak learning rate of the LoRA weights (instruction tuning: lower than DAPT's)."
    )
    assert sft["output_dir"] == "Run directory, laid out like a DAPT run." != train["output_dir"]
    assert sft["seed"] == train["seed"]
    # TrainConfig's value checks apply to SFT with the sft. prefix
    with pytest.raises(ConfigError, match=r"sft.learning_rate = 0.0: must be > 0"):
        SFTConfig(learning_rate=0)


def test_describe_config_documents_every_field():
    text = describe_config()
    for section in ("model:", "adapter:", "data:", "train:", "eval:", "merge:", "sft:"):
        assert section in text
    assert "learning_rate: 0.0005" in text
    assert "# LoRA rank" in text
    lines = text.splitlines()
    for name, cls in SECTIONS.items():
        start = lines.index(f"{name}:  # {cls.__doc__.strip().splitlines()[0]}")
        docs = field_docs(cls)
        rows = iter(lines[start + 1 :])
        for f in dataclasses.fields(cls):
            assert next(rows).startswith(f"  {f.name}: "), (name, f.name)
            assert next(rows) == f"      # {docs[f.name]}", (name, f.name)  # every field has its docstring
    sft = lines[next(i for i, line in enumerate(lines) if line.startswith("sft:")) :]
    assert "  learning_rate: 0.0001" in sft and "  output_dir: runs/sft" in sft
    assert "      # Peak learning rate of the LoRA weights (instruction tuning: lower than DAPT's)." in sft


def test_numeric_checks_name_the_bound():
    with pytest.raises(ConfigError) as err:
        TrainConfig(logging_every=0, save_every=-1, eval_every=-2, batch_size=0)
    assert err.value.problems == [
        "train.batch_size = 0: must be >= 1",
        "train.logging_every = 0: must be >= 1",
        "train.save_every = -1: must be >= 0",
        "train.eval_every = -2: must be >= 0",
    ]
    assert TrainConfig(logging_every=1, save_every=0, eval_every=0).logging_every == 1


def test_unknown_names_without_a_close_match_list_the_known_ones():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"zzz": {}, "model": {"qqqq": 1}})
    assert err.value.problems == [
        "zzz: unknown section; sections are model, adapter, data, train, eval, merge, sft",
        "model.qqqq: unknown key; known keys: name_or_path, gguf_file, quantization, compute_dtype, "
        "double_quant, quant_storage, trust_remote_code, attn_implementation, device",
    ]


def test_wrong_type_does_not_hide_other_problems_or_crash_value_checks():
    with pytest.raises(ConfigError) as err:
        TrainConfig(learning_rate="abc", max_steps=3, warmup_steps=5)
    assert err.value.problems == [
        "train.learning_rate = 'abc': expected float",
        "train.warmup_steps = 5: more than max_steps (3); use fewer warmup steps or more max_steps",
    ]
    # found by the fuzz test: a value check (.strip() on a string field) met a bool
    with pytest.raises(ConfigError, match=r"sft.model_or_run = False: expected str \| null"):
        RunConfig.from_dict({"sft": {"model_or_run": False}})
