"""Knowledge probes (log-likelihood of continuations) and the optional lm-evaluation-harness integration."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from lora_dapt import AdapterConfig, EvalConfig, TrainConfig
from lora_dapt.errors import ConfigError, DataError
from lora_dapt.evaluate.lm_eval import check_lm_eval
from lora_dapt.evaluate.probes import continuation_logprob, load_probes, score_probes
from lora_dapt.model.load import load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.rundir import RunDir
from lora_dapt.train.pretrain import continued_pretrain

from .conftest import make_text
from .test_honest_eval import _blocks


def _write(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _by_hand(model, tok, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt) from the full logits, without lora_dapt's loss."""
    ctx = tok(prompt, add_special_tokens=True)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


def test_probe_scores_equal_a_hand_computation(tiny_model_dir, tmp_path):
    model, tok = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    rows = [
        {"prompt": make_text(6, s), "answer": " tablet dose", "distractors": [" court", " valve pump sensor"]}
        for s in range(6)
    ] + [{"prompt": "the court", "answer": " held", "distractors": [" of"], "split": "general"}]
    probes = load_probes(_write(tmp_path / "p.jsonl", rows))
    expected = {"domain": 0, "general": 0}
    for row in rows:
        answer = _by_hand(model, tok, row["prompt"], row["answer"])
        assert continuation_logprob(model, tok, row["prompt"], row["answer"]) == pytest.approx(
            answer, abs=1e-4
        )
        others = [_by_hand(model, tok, row["prompt"], d) for d in row["distractors"]]
        expected[row.get("split", "domain")] += int(answer > max(others))
    out = score_probes(model, tok, probes)
    assert out["domain"] == {"accuracy": expected["domain"] / 6, "correct": expected["domain"], "total": 6}
    assert out["general"]["correct"] == expected["general"] and out["general"]["total"] == 1
    assert len(out["wrong"]) == 7 - expected["domain"] - expected["general"]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("{not json", "line 2: not valid JSON"),
        ({"prompt": "a", "distractors": [" b"]}, "line 2: 'answer' must be a non-empty string"),
        (
            {"prompt": "a", "answer": " b", "distractors": " c"},
            "line 2: 'distractors' must be a non-empty list",
        ),
        ({"prompt": "a", "answer": " b", "distractors": [" b"]}, "line 2: the answer is also listed"),
        ({"prompt": "a", "answer": " b", "distractors": [" c"], "split": "law"}, "line 2: 'split' = 'law'"),
        (
            {"prompt": "a", "answer": " b", "distractors": [" c"], "hint": 1},
            "line 2: unknown key(s) ['hint']",
        ),
    ],
)
def test_bad_probe_rows_name_the_line_and_the_fix(tmp_path, row, problem):
    good = {"prompt": "a", "answer": " b", "distractors": [" c"]}
    path = _write(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(DataError, match="Fix the row|write one JSON object a line") as err:
        load_probes(path)
    assert problem in str(err.value)


def test_missing_or_empty_probe_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_probes(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no probes"):
        load_probes(tmp_path / "empty.jsonl")


def test_a_run_learns_its_probe_and_reports_it(tiny_model_dir, tmp_path):
    """A probe whose answer is the continuation trained on: right after training, on every base."""
    text = make_text(20, seed=3)
    words = text.split()
    prompt, answer = " ".join(words[:10]), " " + " ".join(words[10:14])
    distractors = [" " + " ".join(make_text(4, seed=s).rstrip(".").split()) for s in (7, 8, 9)]
    probes = _write(
        tmp_path / "probes.jsonl",
        [{"prompt": prompt, "answer": answer, "distractors": distractors}],
    )
    loaded = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype="float32")
    torch.manual_seed(0)
    model = apply_lora(loaded.model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    tok = loaded.tokenizer
    corpus = SimpleNamespace(train=_blocks(tok, [text] * 16), eval=_blocks(tok, [text]), stats=None)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        learning_rate=3e-2,
        batch_size=4,
        gradient_accumulation_steps=1,
        scheduler="constant",
    )
    result = continued_pretrain(
        model,
        tok,
        corpus,
        cfg,
        eval_config=EvalConfig(probes=probes),
        general_texts=[make_text(30, 50)],
        model_source=loaded.source,
    )
    # scored before by hand on the 4-bit base as it was: the LoRA B matrices start at zero
    for base in ("as_trained", "original_16bit"):
        domain = result.probes[base]["domain"]
        assert domain["correct_after"] == domain["total"] == 1 and domain["accuracy_after"] == 1.0
    assert result.before["probes"]["domain"]["total"] == 1
    report = RunDir(tmp_path / "run").report_path.read_text()
    assert "## Knowledge probes" in report and "| original 16-bit model | domain |" in report


def test_lm_eval_missing_package_and_bad_include_path(monkeypatch, tmp_path):
    check_lm_eval([], None)  # nothing asked: nothing checked
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    with pytest.raises(ConfigError, match=r"pip install 'lora-dapt\[lm-eval\]'"):
        check_lm_eval(["hellaswag"], None)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("lm_eval") is not None:
        with pytest.raises(ConfigError, match="eval.lm_eval_include_path = .*not a directory"):
            check_lm_eval(["t"], str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"eval.lm_eval_tasks = \[''\]: every entry must be"):
        EvalConfig(lm_eval_tasks=[""])


LOCAL_TASK = """task: lora_dapt_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_local_task_matches_the_probes(tiny_model_dir, tmp_path):
    """The same multiple-choice items through lm-eval (a local task) and through the probes: same accuracy."""
    from lora_dapt.evaluate.lm_eval import run_lm_eval

    model, tok = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    items = [(make_text(6, s), [" tablet dose", " court", " valve pump"], s % 3) for s in range(8)]
    data = tmp_path / "items.jsonl"
    _write(data, [{"prompt": p, "choices": c, "label": y} for p, c, y in items])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(LOCAL_TASK.format(data=data))
    rows = [{"prompt": p, "answer": c[y], "distractors": [x for x in c if x != c[y]]} for p, c, y in items]
    probes = score_probes(model, tok, load_probes(_write(tmp_path / "p.jsonl", rows)))
    out = run_lm_eval(model, tok, ["lora_dapt_local"], include_path=str(tmp_path / "tasks"), batch_size=2)
    assert out["tasks"]["lora_dapt_local"]["acc"] == pytest.approx(probes["domain"]["accuracy"])
