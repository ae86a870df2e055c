"""train.report_to: TensorBoard, MLflow (local file store) and W&B (offline) get the Trainer's loss rows and
our evaluation rows at the steps of metrics.jsonl, read back with each tracker's own reader; a missing
tracker package or an unknown name is a ConfigError before anything is written."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from lora_dapt import RunConfig
from lora_dapt.errors import ConfigError
from lora_dapt.pipeline import run
from lora_dapt.rundir import RunDir
from lora_dapt.train import trackers as trackers_module
from lora_dapt.train.trackers import TRACKERS, Trackers, check_trackers, merge_figures, scalars, tracker_names

STEPS = 4


def _config(
    tmp_path: Path, model_dir: Path, domain_files: list[Path], merge: bool = False, **train: Any
) -> RunConfig:
    general = tmp_path / "general.txt"
    general.write_text("The weather was mild and the market stalls opened early in the morning. " * 6)
    return RunConfig.from_dict(
        {
            "model": {"name_or_path": str(model_dir), "quantization": "nf4", "compute_dtype": "float32"},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {
                "sources": [str(p) for p in domain_files],
                "seq_len": 64,
                "eval_fraction": 0.25,
                "cache_dir": str(tmp_path / "cache"),
            },
            "train": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": STEPS,
                "learning_rate": 1e-2,
                "batch_size": 2,
                "gradient_accumulation_steps": 1,
                "logging_every": 1,
                "eval_every": 3,  # during at 3, after at 4: one eval row per split and step
                **train,
            },
            # no 16-bit original scored: fewer model loads (its scores are not metrics-log rows anyway)
            "eval": {"general_sources": [str(general)], "max_eval_tokens": 400, "original_base": False},
            "merge": {"enabled": merge},
        }
    )


def _rows(run_dir: Path) -> tuple[dict[int, float], dict[str, dict[str, list[tuple[int, float]]]]]:
    """metrics.jsonl as {step: loss} and {split: {metric: [(step, value), ...]}}."""
    rows = RunDir(run_dir).read_metrics()
    train = {r["step"]: r["loss"] for r in rows if r["type"] == "train"}
    evals: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in (r for r in rows if r["type"] == "eval"):
        for metric in ("loss", "ppl", "bits_per_byte"):
            evals.setdefault(r["split"], {}).setdefault(metric, []).append((r["step"], r[metric]))
    return train, evals


def _assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """Same steps, same values (trackers store float32)."""
    assert [s for s, _ in sorted(got)] == [s for s, _ in sorted(want)]
    for (_, g), (_, w) in zip(sorted(got), sorted(want), strict=True):
        assert g == pytest.approx(w, rel=1e-6)


def _check_merge(run_dir: Path, series: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """The merge's figures are in ``series`` once, at the run's last step, equal to merge_report.json."""
    report = RunDir(run_dir).read_merge_report()
    assert report is not None and report["passed"] is True
    want = {
        "merge/passed": 1.0,
        "merge/perplexity_merged": report["perplexity_merged"],
        "merge/perplexity_adapter": report["perplexity_adapter"],
        "merge/ppl_rel_diff": report["ppl_rel_diff"],
        "merge/losses/merged/perplexity": report["losses"]["merged"]["perplexity"],
    }
    for tag, value in want.items():
        _assert_same(series[tag], [(STEPS, value)])
    assert {t for t in series if t.startswith("merge/")} == set(merge_figures(report)[0])
    return report


def _check_against_metrics(run_dir: Path, series: dict[str, list[tuple[int, float]]], loss_tag: str) -> None:
    train, evals = _rows(run_dir)
    assert sorted(train) == list(range(1, STEPS + 1))
    _assert_same(series[loss_tag], list(train.items()))
    assert set(evals) == {"domain", "general"}
    for split, metrics in evals.items():
        assert [s for s, _ in metrics["ppl"]] == [0, 3, STEPS]  # before, during, after
        for metric, want in metrics.items():
            _assert_same(series[f"eval/{split}/{metric}"], want)
    forgetting = json.loads((run_dir / "summary.json").read_text())["forgetting"]
    flat = scalars("forgetting", forgetting)
    assert "forgetting/general/ppl_change" in flat
    for tag, value in flat.items():
        _assert_same(series[tag], [(STEPS, value)])


def test_tensorboard_and_mlflow_get_the_metrics_log(tiny_model_dir, domain_files, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store for local use
    cfg = _config(
        tmp_path,
        tiny_model_dir,
        domain_files,
        merge=True,  # the merge after training logs its figures to the same tracker runs
        report_to=["tensorboard", "mlflow"],
        run_name="tiny",
    )
    run(cfg)
    run_dir = tmp_path / "run"

    events = EventAccumulator(str(RunDir(run_dir).tensorboard_dir))
    events.Reload()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    _check_against_metrics(run_dir, series, "train/loss")
    report = _check_merge(run_dir, series)
    (text,) = events.Tensors("merge/dtype/text_summary")
    assert (text.step, text.tensor_proto.string_val[0].decode()) == (STEPS, report["dtype"])
    assert not (run_dir / "checkpoints" / "runs").exists()  # the Trainer's default directory is not used

    assert mlflow.active_run() is None  # the run started for us was ended
    client = mlflow.MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs(experiment_ids=["0"])  # the merge continued the training's run
    assert found.info.run_name == "tiny" and found.info.status == "FINISHED"
    recorded = RunDir(run_dir).read_trackers()
    assert recorded["report_to"] == ["tensorboard", "mlflow"] and recorded["run_name"] == "tiny"
    assert recorded["mlflow"]["run_id"] == found.info.run_id and recorded["mlflow"]["tracking_uri"] == uri
    series = {
        key: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)]
        for key in found.data.metrics
    }
    _check_against_metrics(run_dir, series, "loss")
    _check_merge(run_dir, series)
    assert found.data.tags["merge/dtype"] == report["dtype"]


def test_a_later_session_continues_the_recorded_run(tmp_path, monkeypatch):
    """A resumed run (or the merge) opens the MLflow run recorded in trackers.json; a fresh start
    (train.overwrite clears the run directory) starts a new one."""
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = RunDir(tmp_path / "run").create()
    for step in (1, 2):  # two sessions of the same run directory
        with Trackers(["mlflow"], "resumed", run=run_dir) as trackers:
            trackers.log_scalars({"train/loss": 3.0 - step}, step)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (first,) = client.search_runs(experiment_ids=["0"])
    assert [(m.step, m.value) for m in client.get_metric_history(first.info.run_id, "train/loss")] == [
        (1, 2.0),
        (2, 1.0),
    ]
    assert run_dir.read_trackers()["mlflow"]["run_id"] == first.info.run_id
    run_dir.clear_previous_run()
    assert run_dir.read_trackers() is None
    with Trackers(["mlflow"], "fresh", run=run_dir) as trackers:
        trackers.log_scalars({"train/loss": 0.5}, 1)
    runs = client.search_runs(experiment_ids=["0"])
    assert sorted(r.info.run_name for r in runs) == ["fresh", "resumed"]
    assert run_dir.read_trackers()["mlflow"]["run_id"] != first.info.run_id


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline ``.wandb`` file (a LevelDB-style log: 32 KiB blocks, each record
    chunk with a 7-byte header crc32 / length / type; the file starts with a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7
    chunks: list[bytes] = []
    records, partial = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            chunks.append(chunk)
        elif kind == 2:  # FIRST
            partial = chunk
        elif kind == 3:  # MIDDLE
            partial += chunk
        elif kind == 4:  # LAST
            chunks.append(partial + chunk)
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def test_wandb_offline(tiny_model_dir, domain_files, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_PROJECT": "lora-dapt-tests",
    }.items():
        monkeypatch.setenv(key, value)
    run(_config(tmp_path, tiny_model_dir, domain_files, report_to="wandb", run_name="tiny-wandb"))
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    # wandb's service process may still be writing the file when finish() returns (seen on a loaded
    # machine): wait for the run's exit record
    deadline = time.monotonic() + 60
    records = _wandb_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "the offline run file has no exit record after 60 s"
        time.sleep(0.5)
        records = _wandb_records(path)
    assert [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"][0] == "tiny-wandb"
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for key, value in row.items():
            if not key.startswith("_") and key != "train/global_step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((row["train/global_step"], value))
    _check_against_metrics(tmp_path / "run", series, "train/loss")


def test_missing_package_fails_before_anything_is_written(
    tiny_model_dir, domain_files, tmp_path, monkeypatch
):
    monkeypatch.setattr(trackers_module, "_installed", lambda module: module != "wandb")
    with pytest.raises(ConfigError) as err:
        run(_config(tmp_path, tiny_model_dir, domain_files, report_to=["tensorboard", "wandb"]))
    assert err.value.problems == [
        "train.report_to names 'wandb' but its package is not installed: pip install wandb (pip install "
        "'lora_dapt[trackers]' installs tensorboard, wandb and mlflow), or remove it from train.report_to"
    ]
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(trackers_module, "_installed", lambda module: module != "comet_ml")
    with pytest.raises(ConfigError, match=r"pip install comet-ml "):
        check_trackers("comet_ml")


def test_names():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"data": {"sources": ["x.txt"]}, "train": {"report_to": ["tensorbord", "none"]}})
    assert "train.report_to = 'tensorbord': not a tracker; did you mean 'tensorboard'?" in err.value.problems
    assert tracker_names("none") == [] and tracker_names(["wandb", "mlflow", "wandb"]) == ["wandb", "mlflow"]
    assert scalars("f", {"a": {"b": 1, "c": None, "d": True, "e": "x"}, "g": 2.5}) == {
        "f/a/b": 1.0,
        "f/g": 2.5,
    }


def test_table_matches_transformers():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(TRACKERS) == set(INTEGRATION_TO_CALLBACK) - {"kubeflow"}
