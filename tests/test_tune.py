"""lora-dapt tune on the tiny model: the grid on one base (bit-identical after), the choice inside the
forgetting budget, table / plot / chosen config, resume, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from lora_dapt import RunConfig
from lora_dapt.cli.main import main
from lora_dapt.data.corpus import prepare_corpus
from lora_dapt.errors import ConfigError
from lora_dapt.evaluate.forgetting import general_texts
from lora_dapt.model.load import load_base_model
from lora_dapt.train.tune import base_fingerprint, run_trials
from lora_dapt.train.tune_dir import TuneDir
from lora_dapt.train.tune_grid import TrialResult, TuneConfig, choose, learning_rate_grid, make_grid
from lora_dapt.train.tune_report import HEADER

from .conftest import build_model, build_tokenizer, make_text

KNOWING_STEPS = 20

GENERAL = "Hello world. 123 code() Ünïcödé ✓ 456 code() world 789 Hello. "
LRS = [1e-2, 3e-2, 1e-1]  # 0.1 learns the domain fastest and wrecks the general text (5.3 -> ~30 ppl)
SEQ = 32


class CountTrainings(TrainerCallback):
    """Counts the trainings the trials start."""

    def __init__(self) -> None:
        self.trainings = 0

    def on_train_begin(self, args, state, control, **kw):
        self.trainings += 1


@pytest.fixture(scope="module")
def knowing_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama that has learned the general text (so training on the domain can make it forget it)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("tune_model")
    tok = build_tokenizer(d)
    build_model(d, len(tok))
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.tensor([tok(GENERAL * 4).input_ids[:64]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(KNOWING_STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(d)
    return d


def _config(model_dir: Path, tmp: Path) -> RunConfig:
    data = tmp / "domain"
    data.mkdir(exist_ok=True)
    for i in range(16):
        (data / f"doc{i:02d}.txt").write_text(make_text(60, seed=2000 + i), encoding="utf-8")
    (tmp / "general.txt").write_text(GENERAL * 3, encoding="utf-8")
    return RunConfig.from_dict(
        {
            "model": {"name_or_path": str(model_dir), "compute_dtype": "float32"},
            "data": {"sources": [str(data)], "seq_len": SEQ, "eval_fraction": 0.25},
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {
                "output_dir": str(tmp / "run"),
                "batch_size": 2,
                "gradient_accumulation_steps": 1,
                "learning_rate": 1e-2,
                "warmup_ratio": 0.0,
                "scheduler": "cosine",
                "min_lr_ratio": 0.1,
            },
            "eval": {"general_sources": [str(tmp / "general.txt")], "max_general_ppl_increase": 0.05},
        }
    )


BUDGET = 2 * 2 * SEQ  # 2 optimizer steps of 2 blocks
OPTIONS = TuneConfig(learning_rates=LRS, budget_tokens=BUDGET, max_eval_tokens=128)


@pytest.fixture(scope="module")
def tuned(knowing_model_dir, tmp_path_factory):
    """One tune of 3 trials on one loaded base: (config, result, model, fingerprints before/after, counter)."""
    tmp = tmp_path_factory.mktemp("tune")
    cfg = _config(knowing_model_dir, tmp)
    model, tok = load_base_model(knowing_model_dir, quantization="nf4", compute_dtype="float32")
    corpus = prepare_corpus(cfg.data.sources, tok, cfg.data)
    general = general_texts(cfg.eval.general_sources)
    before = base_fingerprint(model)
    counter = CountTrainings()
    result = run_trials(model, tok, corpus, general, cfg, OPTIONS, callbacks=[counter])
    return cfg, result, (model, tok, corpus, general), before, base_fingerprint(model), counter


def test_grid_runs_every_trial_on_one_unchanged_base(tuned):
    cfg, result, (model, *_), before, after, counter = tuned
    assert counter.trainings == 3
    assert [(t.trial, t.learning_rate, t.status) for t in result.trials] == [
        (0, 1e-2, "done"),
        (1, 3e-2, "done"),
        (2, 1e-1, "done"),
    ]
    assert before == after and len(before) > 10  # every base tensor, 4-bit packed ones included
    assert not hasattr(model, "peft_config")  # each adapter was taken off again
    assert [t.steps for t in result.trials] == [2, 2, 2]  # 4 blocks, 2 per step
    assert len({t.tokens for t in result.trials}) == 1  # the same budget for every trial


def test_choice_is_the_best_domain_gain_inside_the_budget(tuned):
    _, result, *_ = tuned
    base_g = result.base["general"]["ppl"]
    by_domain = sorted(result.trials, key=lambda t: t.domain["ppl"])
    # the construction: the huge learning rate learns the domain best and breaks the 5% budget
    assert by_domain[0].learning_rate == 0.1
    assert by_domain[0].general["ppl"] > base_g * 1.05
    inside = [t for t in result.trials if t.general["ppl"] <= base_g * 1.05]
    assert [t.trial for t in inside] == [0, 1]
    best = min(inside, key=lambda t: t.domain["ppl"])
    assert result.budget == 0.05
    assert result.chosen == best.trial == 1
    assert result.trials[1].domain["ppl"] < result.base["domain"]["ppl"]


def _plain_scores(model_dir: Path, adapter_dir: Path | None, tok, corpus, general) -> tuple[float, float]:
    """(domain ppl, general ppl) of the 16-bit model of ``model_dir`` (with the adapter, when given), loaded
    with plain transformers + peft: the domain on the first capped held-out blocks with the model's own loss,
    the general text with lora_dapt's sliding windows on that independently loaded model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_dapt.evaluate.score import evaluate_texts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for block in corpus.eval.select(range(OPTIONS.max_eval_tokens // SEQ)):
            labels = torch.tensor([block["labels"]])
            out = model(
                input_ids=torch.tensor([block["input_ids"]]),
                position_ids=torch.tensor([block["position_ids"]]),
                labels=labels,
            )
            k = int((labels[0, 1:] != -100).sum())
            nll, n = nll + float(out.loss) * k, n + k
    gen = evaluate_texts(model, tok, general, max_tokens=OPTIONS.max_eval_tokens)
    return math.exp(nll / n), gen.ppl


def test_trials_are_scored_on_the_original_16bit_model(tuned, knowing_model_dir):
    """The default score_on: the base's and the chosen trial's figures are those of the original 16-bit
    model, without and with that trial's adapter, scored independently here."""
    _, result, (_, tok, corpus, general), *_ = tuned
    assert result.scored_on == "original_16bit"
    assert "scores on the original 16-bit model" in Path(result.results_path).read_text()
    row = result.trials[result.chosen]
    adapter = (
        TuneDir(Path(result.output_dir)).trial_run(f"lr{row.learning_rate:.4g}-r{row.r}-t64").adapter_dir
    )
    domain, general_ppl = _plain_scores(knowing_model_dir, adapter, tok, corpus, general)
    assert row.domain["ppl"] == pytest.approx(domain, rel=1e-5)
    assert row.general["ppl"] == pytest.approx(general_ppl, rel=1e-5)
    domain, general_ppl = _plain_scores(knowing_model_dir, None, tok, corpus, general)
    assert result.base["domain"]["ppl"] == pytest.approx(domain, rel=1e-5)
    assert result.base["general"]["ppl"] == pytest.approx(general_ppl, rel=1e-5)


def test_choose_rule_on_constructed_rows():
    base = {"general": {"ppl": 10.0}}

    def row(i, dom, gen, status="done"):
        return TrialResult(i, 1e-4 * (i + 1), 8, 16, 64, status, domain={"ppl": dom}, general={"ppl": gen})

    rows = [row(0, 9.0, 10.4), row(1, 7.0, 10.45), row(2, 5.0, 10.6), row(3, 4.0, 9.0, "failed")]
    assert choose(rows, base, 0.05) == 1  # +4.5% is inside, +6% is not; a failed trial never counts
    assert choose(rows, base, 0.07) == 2
    assert choose(rows, base, 0.01) is None
    assert choose([row(0, 6.0, 10.0), row(1, 6.0, 10.0)], base, 0.05) == 0  # a tie goes to the earlier one


def test_table_plot_and_chosen_config(tuned):
    cfg, result, *_ = tuned
    tdir = TuneDir(Path(result.output_dir))
    assert tdir.path == Path(cfg.train.output_dir) / "tune"
    lines = [ln for ln in tdir.results_path.read_text().splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert tuple(cells[0]) == HEADER
    assert [c[0] for c in cells[1:]] == ["0", "1", "2"]
    assert [c[-1] for c in cells[1:]] == ["", "chosen", "over budget"]
    assert cells[2][1] == "0.03" and cells[3][1] == "0.1"
    assert float(cells[2][5].split()[0]) == pytest.approx(result.trials[1].domain["ppl"], abs=1e-3)
    assert f"3 trials x {BUDGET:,} tokens" in result.cost and "estimated" in result.cost

    from lora_dapt.train.tune_report import plot_points

    png = tdir.plot_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    points = plot_points(result)
    assert [p[0] for p in points] == [0, 1, 2]
    gain = 100 * (1 - result.trials[2].domain["ppl"] / result.base["domain"]["ppl"])
    assert points[2][2] == pytest.approx(gain)

    chosen = RunConfig.from_yaml(tdir.chosen_path)
    assert chosen.train.learning_rate == 3e-2
    assert chosen.adapter.r == 4 and chosen.adapter.alpha == 8
    assert chosen.data.sources == cfg.data.sources and chosen.train.output_dir == cfg.train.output_dir
    assert yaml.safe_load(tdir.chosen_path.read_text())["train"]["learning_rate"] == 3e-2


def test_resume_skips_done_trials_and_gives_the_same_choice(tuned):
    cfg, result, (model, tok, corpus, general), before, *_ = tuned
    tdir = TuneDir(Path(result.output_dir))
    lines = tdir.trials_path.read_text().splitlines()
    assert len(lines) == 3
    tdir.trials_path.write_text("\n".join(lines[:2]) + "\n")  # as if killed during the last trial
    counter = CountTrainings()
    again = run_trials(model, tok, corpus, general, cfg, OPTIONS, callbacks=[counter])
    assert counter.trainings == 1  # only the missing trial ran
    assert again.chosen == result.chosen
    assert [t.domain["ppl"] for t in again.trials[:2]] == [t.domain["ppl"] for t in result.trials[:2]]
    assert again.trials[2].domain["ppl"] == pytest.approx(result.trials[2].domain["ppl"], rel=1e-4)
    assert "2 done already, 1 to run" in again.cost
    counter = CountTrainings()
    third = run_trials(model, tok, corpus, general, cfg, OPTIONS, callbacks=[counter])
    assert counter.trainings == 0 and third.chosen == result.chosen
    # only the trial that breaks the budget (done already): nothing chosen, exit 3, no stale chosen.yaml
    alone = run_trials(
        model, tok, corpus, general, cfg, OPTIONS.replace(learning_rates=[1e-1]), callbacks=[counter]
    )
    assert counter.trainings == 0 and alone.chosen is None and alone.exit_status() == 3
    assert not tdir.chosen_path.exists() and "nothing chosen" in tdir.results_path.read_text()
    assert base_fingerprint(model) == before

    with pytest.raises(
        ConfigError, match=r"another plan \(budget_blocks, train_blocks_sha changed\).*--overwrite"
    ):
        run_trials(model, tok, corpus, general, cfg, OPTIONS.replace(budget_tokens=2 * SEQ))


def test_grid_defaults_and_tokens_per_step(tmp_path):
    assert learning_rate_grid(2e-4, 5, 4.0) == [5e-05, 1e-4, 2e-4, 4e-4, 8e-4]
    cfg = _config(tmp_path, tmp_path)  # not loaded: the grid needs only the config
    grid = make_grid(cfg, TuneConfig(trials=3, ranks=[4, 16], tokens_per_step=[64, 128]), SEQ)
    assert len(grid) == 12
    assert {(t.r, t.alpha) for t in grid} == {(4, 8.0), (16, 32.0)}  # alpha / r kept
    assert {(t.tokens_per_step, t.gradient_accumulation_steps) for t in grid} == {(64, 1), (128, 2)}
    assert math.isclose(grid[0].learning_rate, 1e-2 / 4) and math.isclose(grid[2].learning_rate, 4e-2)
    with pytest.raises(ConfigError, match=r"tokens_per_step = \[96\].*multiple of .* = 64"):
        make_grid(cfg, TuneConfig(tokens_per_step=[96]), SEQ)
    with pytest.raises(ConfigError, match=r"tune.trials = 0: must be >= 1"):
        TuneConfig(trials=0)


def test_cli_tune_end_to_end(knowing_model_dir, tmp_path, capsys):
    cfg = _config(knowing_model_dir, tmp_path)
    path = tmp_path / "config.yaml"
    cfg.to_yaml(path)
    out = tmp_path / "my-tune"
    argv = ["tune", str(path), "--lr", "1e-2", "--budget-tokens", str(BUDGET), "--eval-tokens", "128"]
    argv += ["--score-on", "as_trained"]  # the fixture's tune scores on the original 16-bit model
    assert main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 0     | 0.01 " in printed and "chosen: trial 0 (learning_rate 0.01, r 4" in printed
    assert "chosen config: " + str(out / "chosen.yaml") in printed
    assert RunConfig.from_yaml(out / "chosen.yaml").train.learning_rate == 1e-2
    rows = TuneDir(out).read_trials()
    assert [(r["learning_rate"], r["steps"], r["status"]) for r in rows] == [(1e-2, 2, "done")]
    assert (out / "tune.png").is_file() and (out / "trials" / "lr0.01-r4-t64" / "adapter").is_dir()
    assert not (Path(cfg.train.output_dir) / "tune").exists()  # --output, not the default place
    assert "scores on the 4-bit base as trained" in (out / "results.md").read_text()
    assert TuneDir(out).read_plan()["plan"]["scored_on"] == "as_trained"


def test_probe_blocks_are_a_seeded_sample_that_reaches_every_component():
    """Packing stores the domain first and replay after it: probes sample the blocks (seeded), not the head."""
    from datasets import Dataset

    from lora_dapt.train.tune_grid import probe_blocks

    ds = Dataset.from_dict({"i": list(range(200)), "part": ["domain"] * 180 + ["replay"] * 20})
    probe = probe_blocks(ds, 40, seed=42)
    assert len(probe) == 40 and len(set(probe["i"])) == 40
    assert probe["i"] == sorted(probe["i"]) and probe["i"] != list(range(40))
    assert probe["i"] == probe_blocks(ds, 40, seed=42)["i"]  # every trial and every rerun: the same blocks
    assert probe["i"] != probe_blocks(ds, 40, seed=7)["i"]
    assert "replay" in probe["part"] and "replay" not in ds.select(range(40))["part"]
    assert probe_blocks(ds, 500, seed=42)["i"] == ds["i"]  # a budget past the set: all of it


def test_forgetting_budget_order():
    from lora_dapt.config import EvalConfig
    from lora_dapt.train.tune_grid import DEFAULT_FORGETTING_BUDGET, forgetting_budget

    with_eval = RunConfig(eval=EvalConfig(max_general_ppl_increase=0.1))
    assert forgetting_budget(TuneConfig(max_general_ppl_increase=0.02), with_eval) == 0.02
    assert forgetting_budget(TuneConfig(), with_eval) == 0.1
    assert forgetting_budget(TuneConfig(), RunConfig()) == DEFAULT_FORGETTING_BUDGET == 0.05
