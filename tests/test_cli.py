"""The whole pipeline through the command line on the tiny model: train -> report -> eval -> merge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_dapt import EvalConfig, RunConfig, TrainConfig
from lora_dapt.cli.main import main
from lora_dapt.model.load import load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.rundir import MERGE_REPORT

from .conftest import make_text


def _config(tmp_path: Path, model_dir: Path, domain_files: list[Path], **train) -> Path:
    general = tmp_path / "general.txt"
    general.write_text("The weather was mild and the market stalls opened early in the morning. " * 6)
    cfg = {
        "model": {"name_or_path": str(model_dir), "quantization": "nf4"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "sources": [str(p) for p in domain_files],
            "seq_len": 64,
            "eval_fraction": 0.25,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 8,
            "learning_rate": 1e-2,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "eval_every": 4,
            **train,
        },
        "eval": {"general_sources": [str(general)], "prompts": ["patient dose"], "max_new_tokens": 5},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_report_eval_merge(tiny_model_dir, domain_files, tmp_path, capsys):
    cfg_path = _config(tmp_path, tiny_model_dir, domain_files)
    assert main(["train", str(cfg_path), "--set", "train.max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "ppl before" in out and "domain" in out and "general" in out
    run = tmp_path / "run"
    saved = RunConfig.from_yaml(run / "config.yaml")
    assert saved.train.max_steps == 10  # the override is in the resolved config
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["phase"], r["split"], r["step"]) for r in rows if r["type"] == "eval"]
    assert ("before", "domain", 0) in evals and ("after", "domain", 10) in evals
    assert ("during", "general", 4) in evals and ("during", "domain", 8) in evals
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 11))
    summary = json.loads((run / "summary.json").read_text())
    dom = summary["forgetting"]["domain"]
    assert dom["ppl_after"] < dom["ppl_before"]  # the domain got easier
    assert summary["data_stats"]["documents_read"] == 12  # the 12 domain files
    assert summary["after"]["samples"][0]["prompt"] == "patient dose"
    # report + plots
    report = (run / "report.md").read_text()
    assert "ppl" in report.lower()
    for png in ("loss.png", "lr.png"):
        with Image.open(run / "plots" / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
            assert len(set(im.convert("L").getdata())) > 2  # not blank
    assert main(["report", str(run)]) == 0
    # eval of the run (base + adapter on the held-out texts)
    capsys.readouterr()
    assert main(["eval", str(run), "--no-general"]) == 0
    table = capsys.readouterr().out
    ppl = float(table.splitlines()[1].split()[3])
    assert ppl == pytest.approx(dom["ppl_after"], rel=0.25)  # windows differ from blocks, same ballpark
    # merge
    capsys.readouterr()
    assert main(["merge", str(run), "--dtype", "float32"]) == 0
    assert f"merged model written: {run / 'merged'}" in capsys.readouterr().out
    assert (run / "merged" / "config.json").is_file()
    merge = json.loads((run / "merged" / MERGE_REPORT).read_text())
    assert merge["passed"] is True and merge["dtype"] == "float32" and merge["trained_quantization"] == "nf4"
    assert merge["eval_tokens"] > 0 and "eval split" in merge["eval_source"]
    for name in ("adapter_4bit_as_trained", "adapter_16bit_original", "merged"):
        assert (
            math.isfinite(merge["losses"][name]["loss"])
            and merge["losses"][name]["tokens"] == merge["eval_tokens"]
        )
    assert merge["max_abs_logit_diff"] <= merge["tolerance"] * merge["logit_scale"]
    assert merge["losses"]["merged"]["loss"] == pytest.approx(
        merge["losses"]["adapter_16bit_original"]["loss"], abs=1e-4
    )
    # the merged model directory evaluates as a plain 16-bit model, on the held-out texts given as files
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for i, text in enumerate(json.loads((run / "eval_texts.json").read_text())):
        (held_out / f"{i}.txt").write_text(text)
    assert main(["eval", str(run / "merged"), "--texts", str(held_out), "--no-general"]) == 0
    merged_ppl = float(capsys.readouterr().out.splitlines()[1].split()[3])
    assert merged_ppl == pytest.approx(ppl, rel=0.05)  # same texts, same windows, merged = base + adapter


def test_prepare_prints_stats(tiny_model_dir, domain_files, tmp_path, capsys):
    assert main(["prepare", str(_config(tmp_path, tiny_model_dir, domain_files))]) == 0
    out = capsys.readouterr().out
    assert "12" in out and "token" in out.lower()


def test_cli_errors_are_one_line_messages(tiny_model_dir, domain_files, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model_dir, domain_files)
    assert main(["train", str(cfg), "--set", "adapter.r=0", "--set", "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "adapter.r = 0: must be > 0" in err and "train.lr: unknown key" in err
    assert "Traceback" not in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(cfg), "--set", f"data.sources=[{empty}]"]) == 2
    assert "no training documents" in capsys.readouterr().err
    assert main(["train", str(cfg), "--set", f"model.name_or_path={tmp_path / 'nomodel'}"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_config_command_lists_keys(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "max_general_ppl_increase" in out and "replay_fraction" in out


def test_forgetting_budget_stops_the_run(tiny_model_dir, tmp_path):
    """Train hard on one domain sentence; general text (other words) gets worse; the budget stops the run."""
    from datasets import Dataset

    from lora_dapt.data.packing import pack_documents

    model, tok = load_base_model(tiny_model_dir, quantization="nf4")
    model = apply_lora(model, r=8, alpha=16, dropout=0.0)
    domain = make_text(20, seed=3)
    docs = [[tok.bos_token_id, *tok(domain, add_special_tokens=False).input_ids, tok.eos_token_id]] * 16
    ds = Dataset.from_list(pack_documents(docs, 32, tok.pad_token_id))
    general = [make_text(60, seed=s) for s in (50, 51)]
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=40,
        learning_rate=3e-2,
        batch_size=4,
        gradient_accumulation_steps=1,
        eval_every=2,
        scheduler="constant",
    )
    from lora_dapt.train.pretrain import continued_pretrain

    result = continued_pretrain(
        model,
        tok,
        ds,
        cfg,
        eval_config=EvalConfig(max_general_ppl_increase=0.05, restore_best=False),
        general_texts=general,
    )
    assert result.stopped is not None and result.stopped.startswith("forgetting budget exceeded at step")
    assert result.steps < 40
    before, after = result.before["general"]["ppl"], result.after["general"]["ppl"]
    assert after > before * 1.05


def test_sft_command_reports_config_problems(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"train": {"output_dir": str(tmp_path / "nothing")}, "sft": {"data": []}}))
    assert main(["sft", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sft.data: empty" in err and "is not a finished DAPT run" in err
    path.write_text(yaml.safe_dump({"model": {"quantization": "nf4"}}))
    assert main(["sft", str(path)]) == 2
    assert "sft: missing section" in capsys.readouterr().err
