"""The forgetting budget acts: the best in-budget adapter is kept and restored, and the report marks the crossing."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from lora_dapt import AdapterConfig, EvalConfig, TrainConfig
from lora_dapt.model.load import load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.rundir import RunDir
from lora_dapt.train.evaluation import BudgetState, RunEvaluation
from lora_dapt.train.pretrain import continued_pretrain

from .conftest import make_text
from .test_honest_eval import _blocks

WEIGHTS = "adapter_model.safetensors"


def test_budget_crossing_restores_the_best_in_budget_checkpoint(tiny_model_dir, tmp_path):
    loaded = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype="float32")
    torch.manual_seed(0)
    model = apply_lora(loaded.model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    tok = loaded.tokenizer
    text = make_text(20, seed=3)  # one sentence, hard: general text gets worse after a few steps
    corpus = SimpleNamespace(
        train=_blocks(tok, [text] * 16), eval=_blocks(tok, [text, make_text(20, seed=4)]), stats=None
    )
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=14,
        learning_rate=3e-2,
        batch_size=4,
        gradient_accumulation_steps=1,
        eval_every=2,
        save_every=2,
        save_total_limit=100,
        scheduler="constant",
        warmup_steps=0,
    )
    eval_cfg = EvalConfig(max_general_ppl_increase=0.02, original_base=False)
    result = continued_pretrain(
        model, tok, corpus, cfg, eval_config=eval_cfg, general_texts=[make_text(60, s) for s in (50, 51)]
    )
    budget = result.budget
    checks = budget["checks"]
    crossed = budget["crossed_at"]
    # it crossed after some in-budget evaluations, and stopped there
    assert crossed == result.steps == checks[-1]["step"] and not checks[-1]["within"]
    inside = [c for c in checks if c["within"]]
    assert len(inside) == len(checks) - 1 >= 2
    assert checks[-1]["general_ppl"] > budget["reference_ppl"] * 1.02
    best = min(inside, key=lambda c: c["domain_loss"])
    assert budget["best_step"] == best["step"] and budget["restored"] is True
    run = RunDir(tmp_path)
    assert budget["best_checkpoint"] == str(run.checkpoint_dir(best["step"]))

    # the saved adapter is the best checkpoint's, not the crossing's
    saved = load_file(str(run.adapter_dir / WEIGHTS))
    at_best = load_file(str(run.checkpoint_dir(best["step"]) / WEIGHTS))
    at_cross = load_file(str(run.checkpoint_dir(crossed) / WEIGHTS))
    assert saved.keys() == at_best.keys() and len(saved) > 0
    assert all(torch.allclose(saved[k], at_best[k], atol=1e-7) for k in saved)
    assert any(not torch.allclose(saved[k], at_cross[k], atol=1e-4) for k in saved)
    # and what 'after' scored is that adapter: its general ppl is inside the budget
    assert result.after["general"]["ppl"] <= result.before["general"]["ppl"] * 1.02

    # said in the log message, the summary and the report
    assert result.stopped.startswith(f"forgetting budget exceeded at step {crossed}")
    assert f"restored the adapter of step {best['step']}" in result.stopped
    summary = run.read_summary()
    assert summary["budget"]["best_step"] == best["step"] and summary["budget"]["crossed_at"] == crossed
    report = run.report_path.read_text()
    assert "## Forgetting budget" in report
    assert f"| {crossed} |" in report and "**budget crossed: run stopped**" in report
    row = next(line for line in report.splitlines() if line.startswith(f"| {best['step']} |"))
    assert row.endswith("best inside the budget (restored) |")


def _evaluation(tmp_path, restore: bool) -> tuple[RunEvaluation, torch.nn.Linear]:
    layer = torch.nn.Linear(3, 2)
    evaluation = RunEvaluation(layer, None, None, None, EvalConfig(restore_best=restore), RunDir(tmp_path))
    evaluation.budget = BudgetState(0.05, 10.0, crossed_at=4, best_step=2, best_domain_loss=1.5)
    evaluation._best_weights = {n: torch.zeros_like(p) for n, p in layer.named_parameters()}
    return evaluation, layer


def test_restore_best_false_keeps_the_crossing_weights(tmp_path):
    kept, layer = _evaluation(tmp_path / "a", restore=False)
    before = layer.weight.detach().clone()
    message = kept.restore_best()
    assert torch.equal(layer.weight, before) and kept.budget.restored is False
    assert message.startswith("kept the adapter of the crossing (eval.restore_best is false)")
    assert "best step inside the budget was 2" in message and "no checkpoint on disk" in message
    restored, layer = _evaluation(tmp_path / "b", restore=True)
    assert restored.restore_best().startswith("restored the adapter of step 2")
    assert torch.count_nonzero(layer.weight) == 0 and restored.budget.restored is True


def test_no_restore_without_a_crossing(tmp_path):
    evaluation, layer = _evaluation(tmp_path, restore=True)
    evaluation.budget.crossed_at = None
    before = layer.weight.detach().clone()
    assert evaluation.restore_best() is None and torch.equal(layer.weight, before)
