"""Resuming under a changed config: refused before anything is written, or applied for real (schedule,
learning rate), and before/after always scored on the same tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_dapt import EvalConfig, TrainConfig
from lora_dapt.cli.main import main
from lora_dapt.config import SECTIONS
from lora_dapt.errors import ConfigError
from lora_dapt.rundir import RunDir
from lora_dapt.train.pretrain import continued_pretrain
from lora_dapt.train.resume_config import RESUME_RULES, compare_configs
from lora_dapt.train.schedule import lr_factor

from .conftest import make_text
from .test_cli import _config
from .test_train import StopAt, blocks, qlora

NO_EVAL = EvalConfig(enabled=False)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what 'nothing changed' compares)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_config_key_is_in_exactly_one_resume_class():
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"train.{f.name}" if section == "sft" and f.name in train_keys else f"{section}.{f.name}"
            classes = [rule for rule, keys in RESUME_RULES.items() if key in keys]
            assert len(classes) == 1, (f"{section}.{f.name}", classes)
    every = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    listed = set().union(*RESUME_RULES.values())
    assert listed <= every, listed - every  # no key of a removed or misspelt field


def test_a_changed_adapter_shape_is_refused_before_anything_changes(
    tiny_model_dir, domain_files, tmp_path, capsys
):
    cfg = _config(tmp_path, tiny_model_dir, domain_files, max_steps=4, save_every=2)
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    before = _files(run)
    assert (
        "config.yaml" in before
        and "metrics.jsonl" in before
        and "checkpoints/checkpoint-4/optimizer.pt" in before
    )
    capsys.readouterr()
    changed = ["--set", "adapter.r=16", "--set", "data.seq_len=48", "--set", "train.resume_from=latest"]
    assert main(["train", str(cfg), *changed]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "(2 problems)" in err
    assert "adapter.r: 8 -> 16" in err and "data.seq_len: 64 -> 48" in err
    assert "another train.output_dir" in err and "train.overwrite=true without train.resume_from" in err
    assert "Traceback" not in err and "size mismatch" not in err
    assert _files(run) == before  # config.yaml, metrics, checkpoints: byte for byte


def test_python_caller_gets_the_same_protection(tiny_model_dir, tmp_path):
    model, tok = qlora(tiny_model_dir, r=4, alpha=8)
    ds = blocks(tok, [make_text(25, s) for s in range(8)])
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, save_every=2, gradient_accumulation_steps=1)
    continued_pretrain(model, tok, ds, cfg, eval_config=NO_EVAL)
    before = _files(tmp_path)
    model, tok = qlora(tiny_model_dir, r=8, alpha=8, use_rslora=True)
    with pytest.raises(ConfigError) as err:
        continued_pretrain(model, tok, ds, cfg.replace(resume_from="latest"), eval_config=NO_EVAL)
    assert err.value.problems[0].startswith("adapter.r: 4 -> 8 (the adapter's shape")
    assert err.value.problems[1].startswith("adapter.use_rslora: False -> True")
    assert len(err.value.problems) == 2
    assert _files(tmp_path) == before


def test_sft_runs_compare_their_sft_section():
    stored = {"sft": {"seq_len": 64, "learning_rate": 1e-4, "data": ["a.jsonl"]}, "data": {"seq_len": 1}}
    new = {"sft": {"seq_len": 128, "learning_rate": 2e-4, "data": ["a.jsonl"]}, "data": {"seq_len": 2}}
    with pytest.raises(ConfigError) as err:
        compare_configs(stored, new, run_dir="r", sft=True)
    assert err.value.problems == [
        "sft.seq_len: 64 -> 128 (the instruction data: the checkpoint's data position is of the old one)"
    ]
    new["sft"]["seq_len"] = 64
    assert compare_configs(stored, new, run_dir="r", sft=True) == ["sft.learning_rate"]


def _session(model_dir, out, *, max_steps, stop_at=None, resume=None, **train):
    model, tok = qlora(model_dir)
    ds = blocks(tok, [make_text(25, s) for s in range(24)])
    cfg = TrainConfig(
        output_dir=str(out),
        max_steps=max_steps,
        batch_size=2,
        gradient_accumulation_steps=1,
        warmup_steps=2,
        min_lr_ratio=0.1,
        save_every=2,
        resume_from=resume,
        **{"learning_rate": 5e-3, **train},
    )
    return continued_pretrain(model, tok, ds, cfg, eval_config=NO_EVAL, callbacks=[StopAt(stop_at)])


def _logged_lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in RunDir(out).read_metrics() if r["type"] == "train"}


def _expected(peak: float, steps: range, total: int) -> dict[int, float]:
    # the row of step s logs the learning rate step s trained with: lr_factor of the 0-based step s - 1
    return {s: peak * lr_factor(s - 1, total, warmup_steps=2, min_lr_ratio=0.1) for s in steps}


def test_a_new_max_steps_rebuilds_the_schedule(tiny_model_dir, tmp_path, caplog):
    assert _session(tiny_model_dir, tmp_path, max_steps=12, stop_at=4).steps == 4
    with caplog.at_level("INFO", logger="lora_dapt"):
        result = _session(tiny_model_dir, tmp_path, max_steps=8, resume="latest")
    assert result.steps == 8
    lrs = _logged_lrs(tmp_path)
    assert sorted(lrs) == list(range(1, 9))
    expected = {**_expected(5e-3, range(1, 5), 12), **_expected(5e-3, range(5, 9), 8)}
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs[8] == pytest.approx(5e-3 * lr_factor(7, 8, warmup_steps=2, min_lr_ratio=0.1))
    assert "train.max_steps: 12 -> 8 (the schedule is rebuilt for the new length" in caplog.text
    assert "resuming at step 4 of 8 (train.max_steps=8)" in caplog.text


def test_a_new_learning_rate_applies_from_the_current_step(tiny_model_dir, tmp_path, caplog):
    _session(tiny_model_dir, tmp_path, max_steps=8, stop_at=4)
    with caplog.at_level("INFO", logger="lora_dapt"):
        result = _session(tiny_model_dir, tmp_path, max_steps=8, resume="latest", learning_rate=2e-2)
    assert result.steps == 8
    expected = {**_expected(5e-3, range(1, 5), 8), **_expected(2e-2, range(5, 9), 8)}
    assert _logged_lrs(tmp_path) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert "train.learning_rate: 0.005 -> 0.02 (applies from the current step)" in caplog.text


def test_a_length_shorter_than_the_checkpoint_is_refused(tiny_model_dir, tmp_path):
    _session(tiny_model_dir, tmp_path, max_steps=12, stop_at=4)
    before = _files(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"train.max_steps=3: the run is now 3 optimizer steps long, but its "
        r"checkpoint .*checkpoint-4 is already at step 4",
    ):
        _session(tiny_model_dir, tmp_path, max_steps=3, resume="latest")
    assert _files(tmp_path) == before


def _eval_corpus(tok):
    held_out = [make_text(25, s) for s in range(100, 106)]
    return SimpleNamespace(
        train=blocks(tok, [make_text(25, s) for s in range(12)]),
        eval=blocks(tok, held_out),
        eval_documents=held_out,
        stats=None,
    )


def test_after_scores_the_tokens_before_scored(tiny_model_dir, tmp_path, caplog):
    general = [make_text(90, seed=99)]
    cfg = TrainConfig(
        output_dir=str(tmp_path), max_steps=6, eval_every=2, save_every=2, gradient_accumulation_steps=1
    )
    model, tok = qlora(tiny_model_dir)
    first = continued_pretrain(
        model,
        tok,
        _eval_corpus(tok),
        cfg,
        eval_config=EvalConfig(max_eval_tokens=96),
        general_texts=general,
        callbacks=[StopAt(2)],
    )
    assert first.steps == 2
    scored = {split: first.before[split]["tokens"] for split in ("domain", "general")}
    assert scored == {"domain": 93, "general": 96}  # 3 blocks of 32 (31 targets each); 96 general tokens
    model, tok = qlora(tiny_model_dir)
    with caplog.at_level("WARNING", logger="lora_dapt"):
        resumed = continued_pretrain(
            model,
            tok,
            _eval_corpus(tok),
            cfg.replace(resume_from="latest"),
            eval_config=EvalConfig(max_eval_tokens=32),
            general_texts=general,
        )
    assert resumed.steps == 6
    assert {split: resumed.after[split]["tokens"] for split in ("domain", "general")} == scored
    rows = [r for r in RunDir(tmp_path).read_metrics() if r["type"] == "eval"]
    after_session = [r for r in rows if r["phase"] in ("during", "after") and r["step"] > 2]
    assert [(r["phase"], r["step"]) for r in after_session] == [
        ("during", 4),
        ("during", 4),
        ("during", 6),
        ("during", 6),
        ("after", 6),
        ("after", 6),
    ]
    assert all(r["eval_tokens"] == scored[r["split"]] for r in after_session)
    assert (
        "eval.max_eval_tokens: this session asks 32, the 'before' evaluation scored with 96: using the "
        "stored 96" in caplog.text
    )
