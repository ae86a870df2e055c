"""RunDir: every read/write pair round-trips, broken files are named, checkpoints count only when complete."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

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

CKPT_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
}


def fake_checkpoint(run: RunDir, step: int, *, tokens: int = 0, marked: bool = True) -> Path:
    """A checkpoint directory with every file a resume loads, small but real (what the Trainer saves)."""
    ckpt = run.checkpoint_dir(step)
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "num_input_tokens_seen": tokens})
    )
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 4}))
    save_file({"lora_A": torch.full((2, 2), float(step))}, ckpt / "adapter_model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, ckpt / "rng_state.pth")
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
    marker = json.loads((run.checkpoint_dir(4) / COMPLETE_MARKER).read_text())
    assert (marker["step"], marker["tokens"], set(marker["files"])) == (4, 128, CKPT_FILES)
    weights = run.checkpoint_dir(4) / "adapter_model.safetensors"
    assert marker["files"]["adapter_model.safetensors"] == {
        "size": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    assert [p.name for p in run.checkpoints()] == ["checkpoint-10", "checkpoint-4"]  # numeric, newest first
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        assert find_resume_checkpoint(tmp_path, "latest") == run.checkpoint_dir(4)
    assert "checkpoint-10: no completion marker (lora_dapt_complete.json missing" in caplog.text
    assert not run.mark_complete(99, 0)  # no such checkpoint: nothing written
    with pytest.raises(TrainingError, match="cannot resume from .*checkpoint-10: no completion marker"):
        run.find_resume_checkpoint(str(run.checkpoint_dir(10)))
    scheduler = run.checkpoint_dir(4) / "scheduler.pt"
    size = scheduler.stat().st_size
    scheduler.write_bytes(b"")
    assert checkpoint_problem(run.checkpoint_dir(4)) == (
        f"scheduler.pt is 0 bytes, {size} when saved (truncated or replaced)"
    )
    assert run.find_resume_checkpoint("latest") is None


def test_a_checkpoint_whose_steps_disagree_is_refused(tmp_path):
    run = RunDir(tmp_path).create()
    ckpt = fake_checkpoint(run, 4, marked=False)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    run.mark_complete(4, 0)
    assert checkpoint_problem(ckpt) == "trainer_state.json says global_step 3, the checkpoint is checkpoint-4"
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (ckpt / "adapter_config.json").write_text("[]")
    run.mark_complete(4, 0)
    assert checkpoint_problem(ckpt) == "adapter_config.json is not a JSON object"


def test_start_resumes_from_the_checkpoint_cuts_the_log_and_drops_later_checkpoints(tmp_path, caplog):
    run = RunDir(tmp_path).create()
    run.append_metric(eval_row(0, "before"))
    for step in range(1, 7):
        run.append_metric(train_row(step))
    ckpt = fake_checkpoint(run, 4, tokens=128)
    fake_checkpoint(run, 2)
    fake_checkpoint(run, 6, marked=False)  # saved after the resume point, by the session being replaced
    with caplog.at_level(logging.WARNING, logger="lora_dapt"), run:
        assert run.start("latest") == Resume(ckpt, 4, 128)
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2, 3, 4]
    assert [p.name for p in run.checkpoints()] == ["checkpoint-4", "checkpoint-2"]
    assert "deleting checkpoint-6: saved after step 4, the checkpoint this run resumes from" in caplog.text
    # an explicit, older checkpoint: the later one goes the same way
    with run:
        assert run.start(str(run.checkpoint_dir(2))) == Resume(run.checkpoint_dir(2), 2, 0)
    assert [p.name for p in run.checkpoints()] == ["checkpoint-2"]
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]


def test_a_fresh_start_in_a_run_is_refused_without_overwrite(tmp_path):
    run = RunDir(tmp_path / "new" / "run")
    with run:
        assert run.start("latest") is None and run.path.is_dir()  # nothing to resume, no run: a fresh start
    for step in (2, 4):
        fake_checkpoint(run, step)
    run.append_metric(train_row(1))
    before = sorted(p.relative_to(run.path) for p in run.path.rglob("*"))
    with pytest.raises(TrainingError) as err, run:
        run.start(None)
    assert str(err.value) == (
        f"{run.path} holds an earlier run (2 checkpoint(s): checkpoint-4, checkpoint-2; metrics.jsonl with 1 "
        "train row(s) up to step 1). Continue it with train.resume_from=latest, or start over with "
        "train.overwrite=true (deletes that run's checkpoints, metrics log and adapter), or choose another "
        "train.output_dir"
    )
    assert sorted(p.relative_to(run.path) for p in run.path.rglob("*")) == before  # nothing deleted


@pytest.mark.parametrize("what", ["adapter", "summary", "metrics"])
def test_any_trace_of_a_finished_run_counts_as_a_run(tmp_path, what):
    run = RunDir(tmp_path).create()
    if what == "adapter":
        run.adapter_dir.mkdir()
    elif what == "summary":
        run.write_summary({"steps": 3})
    else:
        run.append_metric(eval_row(0, "before"))
    expected = {
        "adapter": "adapter/",
        "summary": "summary.json",
        "metrics": "metrics.jsonl with 0 train row(s)",
    }
    assert run.previous_run() == [expected[what]]
    with pytest.raises(TrainingError, match="holds an earlier run"), run:
        run.start(None)


def test_overwrite_warns_and_clears_a_previous_run(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    for step in (2, 4):
        fake_checkpoint(run, step)
    run.append_metric(train_row(1))
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    run.write_summary({"steps": 4})
    run.write_eval_before({"domain": {}})
    run.report_path.write_text("# report")
    run.plots_dir.mkdir()
    (run.path / "keep.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="lora_dapt"), run:
        assert run.start(None, overwrite=True) is None
    assert (
        f"train.overwrite: starting a fresh run in {run.path}, deleting the earlier run's files (2 checkpoint(s): "
        "checkpoint-4, checkpoint-2; metrics.jsonl with 1 train row(s) up to step 1; adapter/; summary.json)"
    ) in caplog.text
    assert run.checkpoints() == [] and run.read_metrics() == [] and run.previous_run() == []
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoints", "keep.txt", "lora_dapt.lock"]
    assert (run.path / "keep.txt").read_text() == "mine"  # only the run's own files go


def test_latest_without_a_usable_checkpoint_refuses_and_deletes_nothing(tmp_path):
    run = RunDir(tmp_path).create()
    run.append_metric(train_row(1))
    run.append_metric(train_row(2))
    with pytest.raises(TrainingError) as err, run:
        run.start("latest")
    assert str(err.value) == (
        f"train.resume_from='latest' found no usable checkpoint in {run.path}, which holds a run "
        "(metrics.jsonl with 2 train row(s) up to step 2); nothing was deleted. It has no checkpoint "
        "(train.save_every = 0 saves only at the end). Resume from a checkpoint you trust with "
        "train.resume_from=PATH, or start over with train.overwrite=true (deletes that run's checkpoints and "
        "metrics log)"
    )
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    fake_checkpoint(run, 2, marked=False)
    with pytest.raises(TrainingError, match=r"Unusable: checkpoint-2: no completion marker"), run:
        run.start("latest")
    assert run.checkpoint_dir(2).is_dir() and len(run.read_metrics()) == 2
    with run:  # overwrite as well: a fresh start
        assert run.start("latest", overwrite=True) is None
    assert run.checkpoints() == [] and run.read_metrics() == []


def test_rotation_keeps_the_newest_complete_ones_and_the_resumed_one(tmp_path):
    run = RunDir(tmp_path).create()
    for step in (1, 3, 5, 6):
        fake_checkpoint(run, step)
    fake_checkpoint(run, 2, marked=False)  # a save that never finished
    fake_checkpoint(run, 4, marked=False)
    assert [p.name for p in run.rotate_checkpoints(5, keep=2)] == [
        "checkpoint-4",
        "checkpoint-2",
        "checkpoint-1",
    ]
    assert [p.name for p in run.checkpoints()] == ["checkpoint-6", "checkpoint-5", "checkpoint-3"]  # 6 > 5
    with run:
        assert run.start(str(run.checkpoint_dir(3))).step == 3  # drops 5 and 6: saved after step 3
        fake_checkpoint(run, 4)
        fake_checkpoint(run, 5)
        assert run.rotate_checkpoints(5, keep=1) == [run.checkpoint_dir(4)]
    assert [p.name for p in run.checkpoints()] == ["checkpoint-5", "checkpoint-3"]  # 3: resumed from


def test_before_resume_can_refuse_before_anything_changes(tmp_path):
    run = RunDir(tmp_path).create()
    for step in range(1, 7):
        run.append_metric(train_row(step))
    fake_checkpoint(run, 4, tokens=128)
    fake_checkpoint(run, 6, marked=False)
    seen = []

    def refuse(resume: Resume) -> None:
        seen.append(resume)
        raise TrainingError("changed config")

    with pytest.raises(TrainingError, match="changed config"), run:
        run.start("latest", before_resume=refuse)
    assert seen == [Resume(run.checkpoint_dir(4), 4, 128)]
    assert [p.name for p in run.checkpoints()] == ["checkpoint-6", "checkpoint-4"]  # nothing deleted
    assert len(run.read_metrics()) == 6  # nor cut
    with run:  # and the lock went with the refusal
        assert run.start("latest", before_resume=seen.append).step == 4
