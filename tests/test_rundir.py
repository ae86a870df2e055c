"""RunDir: every read/write pair round-trips, broken files are named, checkpoints count only when complete."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from lora_dapt import ConfigError, MergeConfig, RunConfig, TrainConfig
from lora_dapt.errors import RunDirError, TrainingError
from lora_dapt.model.load import ModelSource
from lora_dapt.rundir import (
    COMPLETE_MARKER,
    EVAL_TEXTS_KEPT,
    MERGE_REPORT,
    EvalRow,
    Resume,
    RunDir,
    TrainRow,
    checkpoint_problem,
    find_resume_checkpoint,
    write_json_atomic,
)


def fake_checkpoint(run: RunDir, step: int, *, tokens: int = 0, marked: bool = True) -> Path:
    """A checkpoint directory with the files checkpoint_problem looks at (no adapter weights)."""
    ckpt = run.checkpoint_dir(step)
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "num_input_tokens_seen": tokens})
    )
    (ckpt / "optimizer.pt").write_bytes(b"o")
    (ckpt / "scheduler.pt").write_bytes(b"s")
    if marked:
        assert run.mark_complete(step, tokens)
    return ckpt


def train_row(step: int) -> TrainRow:
    return TrainRow(
        step=step,
        loss=2.0 / step,
        lr=1e-3,
        grad_norm=None,
        tokens=32 * step,
        tokens_per_s=5.0,
        elapsed_s=step,
    )


def eval_row(step: int, phase: str) -> EvalRow:
    return EvalRow(
        step=step, phase=phase, split="domain", result={"loss": 1.5, "ppl": 4.48, "tokens": 96}, tokens=7
    )


# ---------------------------------------------------------------------------------------------------------------
# config.yaml
# ---------------------------------------------------------------------------------------------------------------


def test_config_round_trips_as_run_config_and_as_mapping(tmp_path):
    run = RunDir(tmp_path / "run").create()
    assert run.read_config() is None  # nothing written yet
    config = RunConfig.from_dict(
        {
            "model": {"name_or_path": "models/tiny", "quantization": "fp4"},
            "data": {"sources": ["a.txt"], "seq_len": 64},
            "train": {"max_steps": 7, "learning_rate": 3e-4},
            "merge": {"dtype": "float32", "tolerance": 0.5},
        }
    )
    run.write_config(config)
    assert RunConfig.from_dict(run.read_config()) == config
    assert RunConfig.from_yaml(run.config_path) == config
    assert run.read_section("merge", MergeConfig) == MergeConfig(dtype="float32", tolerance=0.5)
    assert run.read_section("train", TrainConfig).max_steps == 7

    mapping = {"model": {"name_or_path": "m", "gguf_file": None}, "train": {"max_steps": 3}}
    run.write_config(mapping)
    assert run.read_config() == mapping
    assert list(run.read_config()) == ["model", "train"]  # section order kept (sort_keys=False)
    assert run.read_section("merge", MergeConfig) == MergeConfig()  # absent section: the defaults
    assert not run.config_path.with_suffix(".yaml.tmp").exists()


def test_config_problems_are_errors_not_defaults(tmp_path):
    run = RunDir(tmp_path).create()
    run.write_config({"merge": {"dtyp": "float32"}})
    with pytest.raises(ConfigError, match="dtyp"):
        run.read_section("merge", MergeConfig)
    run.config_path.write_text("- a\n- list\n", encoding="utf-8")
    with pytest.raises(RunDirError, match="expected a mapping of sections, got list"):
        run.read_config()
    run.config_path.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(RunDirError, match="config.yaml is not valid YAML"):
        run.read_config()


# ---------------------------------------------------------------------------------------------------------------
# run_info.json
# ---------------------------------------------------------------------------------------------------------------


def test_run_info_round_trips_to_an_equal_model_source(tmp_path):
    from lora_dapt import __version__

    run = RunDir(tmp_path).create()
    assert run.read_run_info() is None
    source = ModelSource(
        name_or_path="models/x.gguf",
        gguf_file="x.gguf",
        resolved="/cache/x-123",
        quantization="nf4",
        compute_dtype="bfloat16",
        pad_token="unk",
    )
    run.write_run_info(source)
    assert run.read_run_info() == source
    assert json.loads(run.run_info_path.read_text())["lora_dapt_version"] == __version__
    run.write_run_info(None)  # unknown base: recorded as such, read back as None
    assert run.read_run_info() is None


def test_run_info_from_another_version_keeps_known_fields(tmp_path):
    run = RunDir(tmp_path).create()
    write_json_atomic(
        run.run_info_path, {"base_model": {"name_or_path": "m", "quantization": "int8", "new": 1}}
    )
    assert run.read_run_info() == ModelSource(name_or_path="m", quantization="int8")


def test_garbled_run_info_is_a_run_dir_error(tmp_path):
    run = RunDir(tmp_path).create()
    run.run_info_path.write_text('{"base_model": {"name_or_path": "m"', encoding="utf-8")
    with pytest.raises(RunDirError, match=r"run_info.json is unreadable \(JSONDecodeError"):
        run.read_run_info()
    run.run_info_path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(RunDirError, match="run_info.json: expected a JSON object"):
        run.read_run_info()


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------------------------


def test_metrics_append_and_read_skip_a_cut_last_line(tmp_path, caplog):
    run = RunDir(tmp_path).create()
    assert run.read_metrics() == []
    run.append_metric(eval_row(0, "before"))
    run.append_metric(train_row(1))
    run.append_metric({"type": "custom", "step": 1, "value": 3})
    with run.metrics_path.open("a", encoding="utf-8") as f:
        f.write('{"type": "train", "step": 2, "lo')  # a crash in the middle of a row
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        rows = run.read_metrics()
    assert "last line is cut short" in caplog.text
    assert rows == [
        {
            "type": "eval",
            "step": 0,
            "phase": "before",
            "split": "domain",
            "loss": 1.5,
            "ppl": 4.48,
            "tokens": 7,  # tokens trained so far, not the 96 scored
            "eval_tokens": 96,
        },
        {
            "type": "train",
            "step": 1,
            "loss": 2.0,
            "lr": 1e-3,
            "grad_norm": None,
            "tokens": 32,
            "tokens_per_s": 5.0,
            "elapsed_s": 1,
        },
        {"type": "custom", "step": 1, "value": 3},
    ]
    assert list(rows[1]) == ["type", "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]


def test_metrics_name_a_bad_middle_line(tmp_path, caplog):
    run = RunDir(tmp_path).create()
    run.metrics_path.write_text('{"step": 1}\nnot json\n[3]\n{"step": 4}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        assert run.read_metrics() == [{"step": 1}, {"step": 4}]
    assert "line 2 is not valid JSON" in caplog.text and "line 3 is not a JSON object" in caplog.text


def test_truncate_metrics_keeps_before_rows_and_earlier_steps_only(tmp_path):
    run = RunDir(tmp_path).create()
    run.append_metric(eval_row(0, "before"))
    for step in range(1, 7):
        run.append_metric(train_row(step))
    run.append_metric(eval_row(6, "during"))
    run.append_metric(eval_row(3, "after"))  # an earlier session ended at step 3; the run goes on
    with run.metrics_path.open("a", encoding="utf-8") as f:
        f.write('{"step": 7, "cut')
    run.truncate_metrics(4)
    rows = run.read_metrics()
    assert [(r["type"], r["step"], r.get("phase")) for r in rows] == [
        ("eval", 0, "before"),
        *[("train", s, None) for s in range(1, 5)],
    ]
    run.truncate_metrics(0)  # even a resume from step 0 keeps the base's evaluation
    assert [r.get("phase") for r in run.read_metrics()] == ["before"]


# ---------------------------------------------------------------------------------------------------------------
# eval texts, eval_before, summary, merge report
# ---------------------------------------------------------------------------------------------------------------


def test_eval_texts_are_capped(tmp_path):
    run = RunDir(tmp_path).create()
    assert run.read_eval_texts() is None
    texts = [f"held-out document {i}" for i in range(EVAL_TEXTS_KEPT + 44)]
    run.write_eval_texts(texts)
    assert EVAL_TEXTS_KEPT == 256
    assert run.read_eval_texts() == texts[:256]
    run.eval_texts_path.write_text('["a", 3]', encoding="utf-8")
    with pytest.raises(RunDirError, match="expected a JSON list of strings"):
        run.read_eval_texts()


def test_summary_and_eval_before_round_trip(tmp_path):
    run = RunDir(tmp_path).create()
    assert run.read_summary() is None and run.read_eval_before() is None
    summary = {"steps": 12, "final_loss": 1.25, "stopped": None, "data_stats": {"documents": 3}}
    run.write_summary(summary)
    assert run.read_summary() == summary
    before = {"domain": {"loss": 2.5, "ppl": 12.18}}
    run.write_eval_before(before)
    assert run.read_eval_before() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_before.json", "summary.json"]  # no .tmp left
    run.summary_path.write_text("[]", encoding="utf-8")
    with pytest.raises(RunDirError, match="summary.json: not a JSON object"):
        run.read_summary()


def test_a_merge_is_reused_only_when_verified_and_newer_than_the_adapter(tmp_path):
    run = RunDir(tmp_path).create()
    assert run.read_merge_report() is None and not run.has_current_merge()
    run.adapter_dir.mkdir()
    weights = run.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(b"w")
    run.merged_dir.mkdir()
    (run.merged_dir / "config.json").write_text("{}")
    write_json_atomic(run.merged_dir / MERGE_REPORT, {"passed": True, "max_diff": 0.001})
    assert run.read_merge_report() == {"passed": True, "max_diff": 0.001}
    assert run.has_current_merge()
    later = (run.merged_dir / MERGE_REPORT).stat().st_mtime + 10
    os.utime(weights, (later, later))  # the adapter was trained again after the merge
    assert not run.has_current_merge()
    os.utime(weights, (later - 20, later - 20))
    write_json_atomic(run.merged_dir / MERGE_REPORT, {"passed": False})
    assert not run.has_current_merge()
    (run.merged_dir / MERGE_REPORT).write_text("{cut", encoding="utf-8")
    assert not run.has_current_merge()  # unreadable: merge again
    with pytest.raises(RunDirError, match="merge_report.json is unreadable"):
        run.read_merge_report()


# ---------------------------------------------------------------------------------------------------------------
# opening, layout
# ---------------------------------------------------------------------------------------------------------------


def test_open_refuses_a_missing_directory(tmp_path):
    with pytest.raises(RunDirError, match="run directory not found: .*nope .*metrics.jsonl and config.yaml"):
        RunDir.open(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # RunDirError is one, for callers that catch the builtin
        RunDir.open(tmp_path / "nope")
    assert RunDir.open(str(tmp_path)).path == tmp_path


def test_is_run_and_the_adapter_folder_slip(tmp_path):
    run = RunDir(tmp_path / "run").create()
    assert not RunDir.is_run(run.path) and RunDir.run_of_adapter(run.adapter_dir) is None
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    assert RunDir.is_run(run.path) and run.has_adapter()
    assert RunDir.run_of_adapter(run.adapter_dir) == run.path
    assert RunDir.run_of_adapter(run.path) is None
    assert not run.has_adapter_tokenizer()
    (run.adapter_dir / "tokenizer_config.json").write_text("{}")
    assert run.has_adapter_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints, resume and fresh start
# ---------------------------------------------------------------------------------------------------------------


def test_latest_skips_a_newer_unmarked_checkpoint(tmp_path, caplog):
    run = RunDir(tmp_path).create()
    assert run.find_resume_checkpoint("latest") is None
    fake_checkpoint(run, 4, tokens=128)
    fake_checkpoint(run, 10, marked=False)  # newer, but its save never finished
    assert json.loads((run.checkpoint_dir(4) / COMPLETE_MARKER).read_text()) == {"step": 4, "tokens": 128}
    assert [p.name for p in run.checkpoints()] == ["checkpoint-10", "checkpoint-4"]  # numeric, newest first
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        assert find_resume_checkpoint(tmp_path, "latest") == run.checkpoint_dir(4)
    assert "checkpoint-10: no completion marker" in caplog.text
    assert not run.mark_complete(99, 0)  # no such checkpoint: nothing written
    with pytest.raises(TrainingError, match="cannot resume from .*checkpoint-10: no completion marker"):
        run.find_resume_checkpoint(str(run.checkpoint_dir(10)))
    (run.checkpoint_dir(4) / "scheduler.pt").write_bytes(b"")
    assert checkpoint_problem(run.checkpoint_dir(4)) == "scheduler.pt missing or empty"
    assert run.find_resume_checkpoint("latest") is None


def test_start_resumes_from_the_checkpoint_and_cuts_the_log(tmp_path):
    run = RunDir(tmp_path).create()
    run.append_metric(eval_row(0, "before"))
    for step in range(1, 7):
        run.append_metric(train_row(step))
    ckpt = fake_checkpoint(run, 4, tokens=128)
    assert run.start("latest") == Resume(ckpt, 4, 128)
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2, 3, 4]
    assert run.start(None) is None  # a fresh start now clears that run
    assert run.checkpoints() == [] and not run.metrics_path.exists()


def test_fresh_start_warns_and_clears_a_previous_run(tmp_path, caplog):
    run = RunDir(tmp_path / "new" / "run")
    assert run.start("latest") is None and run.path.is_dir()  # nothing to resume: a fresh start
    for step in (2, 4):
        fake_checkpoint(run, step)
    run.append_metric(train_row(1))
    (run.path / "keep.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        assert run.start(None) is None
    assert "replacing the previous run's metrics log and 2 checkpoint(s)" in caplog.text
    assert run.checkpoints() == [] and run.read_metrics() == []
    assert (run.path / "keep.txt").read_text() == "mine"  # only the run's own files go
