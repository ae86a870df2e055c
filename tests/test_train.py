"""continued_pretrain on the tiny model: learning, frozen base, reload, resume, param groups, errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from lora_dapt import AdapterConfig, EvalConfig, TrainConfig
from lora_dapt.data.packing import pack_documents
from lora_dapt.errors import DataError, TrainingError
from lora_dapt.model.load import ModelSource, load_base_model
from lora_dapt.model.lora import apply_lora, load_adapter
from lora_dapt.model.loss import causal_lm_loss_sum
from lora_dapt.rundir import RunDir, find_resume_checkpoint
from lora_dapt.train.pretrain import continued_pretrain
from lora_dapt.train.schedule import lr_factor, total_optimizer_steps

from .conftest import make_text

NO_EVAL = EvalConfig(enabled=False)


def blocks(tok, texts: list[str], seq_len: int = 32) -> Dataset:
    docs = [[tok.bos_token_id, *tok(t, add_special_tokens=False).input_ids, tok.eos_token_id] for t in texts]
    return Dataset.from_list(pack_documents(docs, seq_len, tok.pad_token_id))


def qlora(model_dir, **adapter):
    model, tok = load_base_model(model_dir, quantization="nf4", compute_dtype="float32")  # exact checks
    torch.manual_seed(0)  # the LoRA A matrices are drawn from torch's global generator
    return apply_lora(model, AdapterConfig(**{"r": 8, "alpha": 16, "dropout": 0.0, **adapter})), tok


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lr_schedules():
    kw = {"warmup_steps": 10, "min_lr_ratio": 0.1}
    assert lr_factor(0, 100, **kw) == pytest.approx(1 / 11)
    assert lr_factor(10, 100, **kw) == pytest.approx(1.0)
    assert lr_factor(100, 100, **kw) == pytest.approx(0.1)
    assert lr_factor(55, 100, scheduler="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(55, 100, scheduler="linear", **kw) == pytest.approx(0.55)
    assert lr_factor(70, 100, scheduler="constant", **kw) == 1.0
    wsd = [lr_factor(s, 100, scheduler="wsd", decay_ratio=0.2, **kw) for s in range(101)]
    assert wsd[10:80] == [1.0] * 70 and wsd[90] == pytest.approx(0.55) and wsd[100] == pytest.approx(0.1)


def test_total_steps_from_steps_epochs_tokens():
    cfg = TrainConfig(batch_size=2, gradient_accumulation_steps=4)
    assert total_optimizer_steps(100, cfg, 128) == 13  # one epoch: ceil(100 / 8)
    assert total_optimizer_steps(100, cfg.replace(epochs=2.0), 128) == 25
    assert total_optimizer_steps(100, cfg.replace(max_tokens=8 * 128 * 5), 128) == 5
    assert total_optimizer_steps(100, cfg.replace(max_steps=7, epochs=3.0), 128) == 7


def test_chunked_loss_equals_model_loss(tiny_model_dir, monkeypatch):
    import lora_dapt.model.loss as train_mod

    model, tok = qlora(tiny_model_dir, init_lora_weights=False)
    ds = blocks(tok, [make_text(30, s) for s in range(4)], seq_len=48)
    batch = {k: torch.tensor(ds[:2][k]) for k in ("input_ids", "labels", "position_ids")}
    monkeypatch.setattr(train_mod, "LOSS_LOGITS_BUDGET", 0)  # force the chunked, recomputed path
    monkeypatch.setattr(train_mod, "LOSS_CHUNK_TOKENS", 7)  # many chunks, one ragged
    assert train_mod.loss_chunk_tokens(320) == 16  # never fewer than 16 positions a chunk
    monkeypatch.setattr(train_mod, "loss_chunk_tokens", lambda vocab: 7)
    loss_sum, n = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
    ref = model(**batch, use_cache=False).loss  # transformers' own mean over shifted labels
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert (loss_sum / n).item() == pytest.approx(ref.item(), rel=1e-5)
    loss_sum.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_qlora_learns_and_base_stays_frozen(tiny_model_dir, tmp_path):
    model, tok = qlora(tiny_model_dir)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = lora_state(model)
    text = make_text(24, seed=7)
    ds = blocks(tok, [text] * 16, seq_len=32)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=30,
        learning_rate=1e-2,
        batch_size=4,
        gradient_accumulation_steps=1,
        scheduler="constant",
        warmup_steps=2,
    )
    result = continued_pretrain(model, tok, ds, cfg, eval_config=NO_EVAL)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    first, last = train_rows[0]["loss"], train_rows[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    assert result.steps == 30 and result.final_loss == pytest.approx(last)
    assert result.tokens_trained == train_rows[-1]["tokens"] > 0
    assert all(r["tokens_per_s"] > 0 for r in train_rows)
    # every LoRA B matrix moved; every base weight (4-bit bytes, norms, embeddings) is bit-identical
    lora_after = lora_state(model)
    assert all(not torch.equal(lora_before[n], lora_after[n]) for n in lora_after if "lora_B" in n)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(base_before[n], p.detach()), n
    # run directory layout
    run = tmp_path / "run"
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "run_info.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer_config.json",
    ):
        assert (run / f).is_file(), f
    assert json.loads((run / "run_info.json").read_text())["base_model"]["quantization"] == "nf4"
    saved = RunDir.open(run)
    assert saved.read_run_info().name_or_path == str(tiny_model_dir)  # guessed from the model's config
    config = saved.read_config()  # assembled from the parts (no run_config given)
    assert config["train"]["max_steps"] == 30 and config["train"]["learning_rate"] == 1e-2
    assert config["adapter"]["r"] == 8 and config["model"]["quantization"] == "nf4"
    assert config["eval"]["enabled"] is False
    summary = saved.read_summary()
    assert summary["steps"] == 30 and summary["final_loss"] == pytest.approx(last)
    assert summary["tokens_trained"] == result.tokens_trained and summary["stopped"] is None
    assert summary["data_stats"] == {}  # a bare Dataset has no corpus stats
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_saved_adapter_reloads_to_same_logits(tiny_model_dir, tmp_path):
    model, tok = qlora(tiny_model_dir)
    ds = blocks(tok, [make_text(20, s) for s in range(8)])
    source = ModelSource(name_or_path="somewhere/else", quantization="nf4", compute_dtype="float32")
    continued_pretrain(
        model,
        tok,
        ds,
        TrainConfig(output_dir=str(tmp_path), max_steps=5, learning_rate=1e-2, gradient_accumulation_steps=1),
        eval_config=NO_EVAL,
        model_source=source,
    )
    assert RunDir(tmp_path).read_run_info() == source  # what the caller said, not a guess
    assert RunDir(tmp_path).read_config()["model"]["name_or_path"] == "somewhere/else"
    x = torch.tensor([ds[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    fresh, _ = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype="float32")
    reloaded = load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = reloaded(input_ids=x).logits
    assert torch.allclose(expected, got, atol=1e-5)
    # and the adapter did something: differs from the bare base
    bare, _ = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype="float32")
    with torch.no_grad():
        assert not torch.allclose(bare(input_ids=x).logits, got, atol=1e-3)


class StopAt(TrainerCallback):
    """Stops the run after optimizer step ``step`` (None: never), as a crash after it would."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if self.step is not None and state.global_step == self.step:
            control.should_training_stop = True


class GrabParamGroups(TrainerCallback):
    """Records each optimizer parameter group's (learning rate, number of tensors) at the start."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[float, int]] = {}

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.seen.update({g["name"]: (g["lr"], len(g["params"])) for g in optimizer.param_groups})


def _run(model_dir, out, max_steps, *, stop_at=None, resume=None, save_every=4):
    model, tok = qlora(model_dir)
    ds = blocks(tok, [make_text(25, s) for s in range(24)])
    cfg = TrainConfig(
        output_dir=str(out),
        max_steps=max_steps,
        learning_rate=5e-3,
        batch_size=2,
        gradient_accumulation_steps=2,
        warmup_steps=2,
        save_every=save_every,
        resume_from=resume,
    )
    result = continued_pretrain(model, tok, ds, cfg, eval_config=NO_EVAL, callbacks=[StopAt(stop_at)])
    return model, result


def test_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    full_model, full = _run(tiny_model_dir, tmp_path / "full", 12)
    _, part = _run(tiny_model_dir, tmp_path / "part", 12, stop_at=6)  # last checkpoint: step 4
    assert part.steps == 6
    resumed_model, resumed = _run(tiny_model_dir, tmp_path / "part", 12, resume="latest")
    assert resumed.steps == full.steps == 12
    a, b = lora_state(full_model), lora_state(resumed_model)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["type"] == "train"]
    assert steps == list(range(1, 13))  # steps 5-6 of the stopped run were cut back, none twice
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in full_rows])  # scheduler position
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full_rows], rel=1e-4)


def test_embedding_param_group_has_its_own_lr(tiny_tied_model_dir, tmp_path):
    grab = GrabParamGroups()
    seen = grab.seen
    model, tok = qlora(tiny_tied_model_dir, train_embeddings=True)
    ds = blocks(tok, [make_text(20, s) for s in range(4)])
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        learning_rate=1e-3,
        embedding_learning_rate=2e-5,
        scheduler="constant",
        gradient_accumulation_steps=1,
    )
    continued_pretrain(model, tok, ds, cfg, eval_config=NO_EVAL, callbacks=[grab])
    assert seen["lora"][0] == pytest.approx(1e-3 / 1)  # constant schedule, no warmup
    assert seen["embeddings"][0] == pytest.approx(2e-5)
    n_lora = sum(1 for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    assert seen["lora"][1] == n_lora > 0
    assert seen["embeddings"][1] == 1  # tied: the one embedding matrix is also the head
    # default: a tenth of the LoRA learning rate
    seen.clear()
    model, tok = qlora(tiny_tied_model_dir, train_embeddings=True)
    continued_pretrain(
        model,
        tok,
        ds,
        cfg.replace(embedding_learning_rate=None, output_dir=str(tmp_path / "b")),
        eval_config=NO_EVAL,
        callbacks=[grab],
    )
    assert seen["embeddings"][0] == pytest.approx(1e-4)


def test_empty_corpus_and_plain_model_are_refused(tiny_model_dir, tmp_path):
    model, tok = qlora(tiny_model_dir)
    empty = Dataset.from_dict({"input_ids": [], "labels": [], "position_ids": []})
    with pytest.raises(DataError, match="training set is empty"):
        continued_pretrain(model, tok, empty, TrainConfig(output_dir=str(tmp_path)), eval_config=NO_EVAL)
    bare, tok = load_base_model(tiny_model_dir, quantization=None)
    with pytest.raises(TrainingError, match="call lora_dapt.apply_lora"):
        continued_pretrain(
            bare, tok, blocks(tok, ["a b c"]), TrainConfig(output_dir=str(tmp_path)), eval_config=NO_EVAL
        )


def test_8bit_optimizer_on_cpu_is_refused(tiny_model_dir, tmp_path):
    model, tok = qlora(tiny_model_dir)
    with pytest.raises(TrainingError, match="paged_adamw_8bit.*needs a CUDA GPU"):
        continued_pretrain(
            model,
            tok,
            blocks(tok, ["a b c"]),
            TrainConfig(output_dir=str(tmp_path), optimizer="paged_adamw_8bit"),
            eval_config=NO_EVAL,
        )


def test_fresh_run_in_old_directory_replaces_old_checkpoints(tiny_model_dir, tmp_path, caplog):
    model, tok = qlora(tiny_model_dir)
    ds = blocks(tok, [make_text(20, s) for s in range(8)])
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=4, save_every=2, gradient_accumulation_steps=1)
    continued_pretrain(model, tok, ds, cfg, eval_config=NO_EVAL)
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()
    model, tok = qlora(tiny_model_dir)
    with caplog.at_level("WARNING", logger="lora_dapt"):
        continued_pretrain(model, tok, ds, cfg.replace(max_steps=2, overwrite=True), eval_config=NO_EVAL)
    assert "train.overwrite: starting a fresh run" in caplog.text and "2 checkpoint(s)" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


@pytest.mark.parametrize("chunked", [False, True])
def test_frozen_head_loss_gradients_equal_autograd(tiny_model_dir, monkeypatch, chunked):
    """The frozen-head loss computes d(loss)/d(hidden) in the forward pass; it must equal autograd's."""
    import lora_dapt.model.loss as train_mod

    model, tok = qlora(tiny_model_dir, init_lora_weights=False)
    ds = blocks(tok, [make_text(30, s) for s in range(4)], seq_len=48)
    batch = {k: torch.tensor(ds[:2][k]) for k in ("input_ids", "labels", "position_ids")}
    if chunked:
        monkeypatch.setattr(train_mod, "LOSS_LOGITS_BUDGET", 0)
        monkeypatch.setattr(train_mod, "loss_chunk_tokens", lambda vocab: 7)
    used = []
    real = train_mod._FrozenHeadCrossEntropy.apply
    monkeypatch.setattr(train_mod._FrozenHeadCrossEntropy, "apply", lambda *a: used.append(a[4]) or real(*a))

    def loss_and_grads():
        model.zero_grad()
        loss_sum, n = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
        (
            loss_sum / n * 3.0
        ).backward()  # a scale, as gradient accumulation gives, reaches the stored gradient
        return loss_sum.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    fused_loss, fused = loss_and_grads()
    assert used == [7 if chunked else int((batch["labels"][:, 1:] != -100).sum())]
    monkeypatch.setattr(train_mod, "_frozen_linear_head", lambda head: False)  # autograd's own path
    ref_loss, ref = loss_and_grads()
    assert len(used) == 1
    assert fused_loss == pytest.approx(ref_loss, rel=1e-6)
    assert fused.keys() == ref.keys() and len(ref) > 4
    for k in ref:
        assert ref[k].abs().max() > 0, k
        torch.testing.assert_close(fused[k], ref[k], atol=1e-6, rtol=1e-5)


def test_trainable_head_takes_the_autograd_loss(tiny_model_dir):
    from lora_dapt.model.loss import _frozen_linear_head

    model, _ = qlora(tiny_model_dir)
    head = model.get_base_model().get_output_embeddings()
    assert _frozen_linear_head(head)
    head.weight.requires_grad_(True)
    assert not _frozen_linear_head(head)
    ids = torch.randint(3, 300, (1, 12))
    loss_sum, n = causal_lm_loss_sum(model, ids, ids.clone())
    loss_sum.backward()
    assert n == 11 and head.weight.grad is not None and head.weight.grad.abs().max() > 0


def test_resume_after_the_last_step_takes_the_checkpoint(tiny_model_dir, tmp_path):
    """The process died after its last checkpoint: resuming must not train a step more."""
    model, done = _run(tiny_model_dir, tmp_path, 4, save_every=2)
    trained = lora_state(model)
    (tmp_path / "adapter").rename(tmp_path / "adapter-first")
    resumed_model, resumed = _run(tiny_model_dir, tmp_path, 4, resume="latest", save_every=2)
    assert resumed.steps == done.steps == 4 and resumed.tokens_trained == done.tokens_trained
    after = lora_state(resumed_model)
    for n in trained:
        assert torch.equal(trained[n], after[n]), n  # the checkpoint's weights, not a fresh init
    rows = RunDir(tmp_path).read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # no step logged twice
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def _eval_corpus(tok):
    held_out = [make_text(25, s) for s in range(100, 104)]
    return SimpleNamespace(
        train=blocks(tok, [make_text(25, s) for s in range(12)]),
        eval=blocks(tok, held_out),
        eval_documents=held_out,
        stats=None,
    )


def test_evaluation_rows_and_a_resume_reuses_the_base_scores(tiny_model_dir, tmp_path):
    general = [make_text(30, seed=99)]
    cfg = TrainConfig(
        output_dir=str(tmp_path), max_steps=4, eval_every=2, save_every=2, gradient_accumulation_steps=1
    )
    model, tok = qlora(tiny_model_dir)
    corpus = _eval_corpus(tok)
    result = continued_pretrain(model, tok, corpus, cfg, general_texts=general)
    run = RunDir(tmp_path)
    evals = [(r["phase"], r["split"], r["step"]) for r in run.read_metrics() if r["type"] == "eval"]
    assert evals == [
        *[("before", split, 0) for split in ("domain", "general")],
        *[("during", split, 2) for split in ("domain", "general")],
        *[("during", split, 4) for split in ("domain", "general")],
        *[("after", split, 4) for split in ("domain", "general")],
    ]
    stored = run.read_eval_before()
    assert set(result.before) == {
        "domain",
        "general",
        "original_16bit",
    }  # a QLoRA run: the 16-bit original too
    assert {k: v for k, v in stored.items() if k != "scored_with"} == result.before
    assert stored["scored_with"]["domain_tokens"] == result.before["domain"]["tokens"]  # what it scored
    assert run.read_eval_texts() == corpus.eval_documents
    assert result.after["domain"]["loss"] != result.before["domain"]["loss"]
    assert set(result.forgetting) and result.stopped is None

    # the resumed session compares with the base as first measured, not with its own starting point
    marker = {"domain": {"loss": 9.0, "ppl": 8103.08}, "general": {"loss": 9.5, "ppl": 13359.7}}
    run.write_eval_before(marker)
    model, tok = qlora(tiny_model_dir)
    resumed = continued_pretrain(
        model, tok, _eval_corpus(tok), cfg.replace(max_steps=6, resume_from="latest"), general_texts=general
    )
    assert resumed.steps == 6 and resumed.before == marker
    phases = [(r["phase"], r["step"]) for r in run.read_metrics() if r["type"] == "eval"]
    assert phases.count(("before", 0)) == 2  # the first session's rows only: not measured again
    assert ("after", 4) not in phases and phases[-2:] == [("after", 6), ("after", 6)]


def test_forgetting_budget_stops_and_checkpoints_at_that_step(tiny_model_dir, tmp_path):
    model, tok = qlora(tiny_model_dir)
    text = make_text(20, seed=3)
    ds = blocks(tok, [text] * 16)  # one sentence, hard: general text gets worse at once
    cfg = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=20,
        learning_rate=3e-2,
        batch_size=4,
        gradient_accumulation_steps=1,
        eval_every=2,
        scheduler="constant",
    )
    eval_cfg = EvalConfig(max_general_ppl_increase=0.01, restore_best=False)  # the crossing's weights
    result = continued_pretrain(
        model, tok, ds, cfg, eval_config=eval_cfg, general_texts=[make_text(60, s) for s in (50, 51)]
    )
    assert result.stopped is not None
    assert result.stopped.startswith(f"forgetting budget exceeded at step {result.steps}: general ppl")
    assert 2 <= result.steps < 20 and result.steps % 2 == 0
    assert result.after["general"]["ppl"] > 1.01 * result.before["general"]["ppl"]
    # the stop saved a checkpoint at that step (save_every is 0), complete and resumable
    assert (
        find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / f"checkpoint-{result.steps}"
    )
    assert RunDir(tmp_path).read_summary()["stopped"] == result.stopped


def test_cpu_head_chunks_stay_cache_sized(tiny_model_dir, monkeypatch):
    """On the CPU the frozen head's chunks hold at most CPU_HEAD_CHUNK_BYTES of fp32 logits; same loss."""
    import lora_dapt.model.loss as loss_mod

    model, tok = qlora(tiny_model_dir, init_lora_weights=False)
    ds = blocks(tok, [make_text(30, s) for s in range(4)], seq_len=48)
    batch = {k: torch.tensor(ds[:2][k]) for k in ("input_ids", "labels", "position_ids")}
    vocab = model.get_base_model().config.vocab_size
    used = []
    real = loss_mod._FrozenHeadCrossEntropy.apply
    monkeypatch.setattr(loss_mod._FrozenHeadCrossEntropy, "apply", lambda *a: used.append(a[4]) or real(*a))
    with torch.no_grad():
        whole = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
        monkeypatch.setattr(loss_mod, "CPU_HEAD_CHUNK_BYTES", 20 * 4 * vocab)  # 20 positions a chunk
        chunked = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
    assert used == [whole[1], 20] and whole[1] > 40
    assert chunked[1] == whole[1]
    assert chunked[0].item() == pytest.approx(whole[0].item(), rel=1e-6)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_bf16_autocast_runs_lora_matmuls_in_bf16_on_fp32_weights(tiny_model_dir, tmp_path, precision):
    """train.precision auto with a bf16 compute dtype: the LoRA matmuls run in bf16 (no fp32 casts of their
    input), the LoRA weights stay fp32 and learn; fp32 keeps peft's fp32 LoRA path."""
    from lora_dapt.train.trainer import _precision_flags

    model, tok = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype="bfloat16")
    torch.manual_seed(0)
    model = apply_lora(model, AdapterConfig(r=8, alpha=16, dropout=0.0, gradient_checkpointing=False))
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, precision=precision, save_every=0)
    assert _precision_flags(model, cfg, "bfloat16") == {"bf16": precision == "auto", "fp16": False}
    lora_a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
    seen = []
    hook = lora_a.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    before = lora_state(model)
    ds = blocks(tok, [make_text(40, s) for s in range(8)])
    continued_pretrain(model, tok, ds, cfg, eval_config=NO_EVAL)
    hook.remove()
    want = torch.bfloat16 if precision == "auto" else torch.float32
    assert seen and set(seen) == {(want, want)}
    after = lora_state(model)
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # outside training (evaluation) peft's own casting is back: the fp32 LoRA path on a bf16 input works
    with torch.no_grad():
        loss_sum, n = causal_lm_loss_sum(
            model, torch.tensor(ds[:1]["input_ids"]), torch.tensor(ds[:1]["labels"])
        )
    assert n > 0 and torch.isfinite(loss_sum)
