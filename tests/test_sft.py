"""sft: row formats and their labels, malformed rows, learning on the tiny model, DAPT run -> sft -> merge."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file

from lora_dapt import AdapterConfig, EvalConfig, MergeConfig, ModelConfig, RunConfig, SFTConfig, TrainConfig
from lora_dapt.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    chat_prompt,
    detect_format,
    ensure_chat_template,
    load_conversations,
    prepare_sft_data,
    tokenize_conversation,
)
from lora_dapt.data.packing import pack_documents
from lora_dapt.errors import ConfigError, DataError, ModelLoadError, RunDirError
from lora_dapt.evaluate.generate import generate_chat
from lora_dapt.export.merge import merge_run
from lora_dapt.model.load import load_base_model, load_tokenizer
from lora_dapt.model.lora import apply_lora
from lora_dapt.rundir import RunDir
from lora_dapt.train.pretrain import continued_pretrain
from lora_dapt.train.sft import sft, sft_from_config

from .conftest import make_text

TOY = Path(__file__).resolve().parents[1] / "examples" / "sft_toy.jsonl"
SMALL = AdapterConfig(r=4, alpha=8, dropout=0.0, gradient_checkpointing=False)
FAST = {"seq_len": 256, "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "eval_fraction": 0.2}

SYSTEM, USER, ANSWER = "Be brief.", "Which field is 'dose' from?", "medicine"
ROWS = {
    "messages": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "And 'court'?"},
            {"role": "assistant", "content": "law"},
        ]
    },
    "prompt_completion": {"prompt": USER, "completion": ANSWER},
    "alpaca": {"system": SYSTEM, "instruction": USER, "input": "one word", "output": ANSWER},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": USER},
            {"from": "gpt", "value": ANSWER},
        ]
    },
}
ANSWERS = {
    "messages": [ANSWER, "law"],
    "prompt_completion": [ANSWER],
    "alpaca": [ANSWER],
    "sharegpt": [ANSWER],
}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    t = load_tokenizer(tiny_model_dir)  # pad = <unk> (the tiny tokenizer has no pad token)
    assert ensure_chat_template(t) == "default"
    return t


def trained_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i  # a trained position is trained on its own token
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


# --------------------------------------------------------------------------------------------------------------
# Formats and labels (no model)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(ROWS))
def test_labels_train_only_assistant_tokens_and_eos(tok, fmt, tmp_path):
    (conv,) = load_conversations(write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]]))
    assert conv.format == fmt == detect_format(ROWS[fmt])
    ids, labels = tokenize_conversation(tok, conv.messages)
    assert ids == tok.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    # exactly the answers and the EOS closing each: no system, user, header or BOS token is trained
    assert trained_runs(tok, ids, labels) == [a + tok.eos_token for a in ANSWERS[fmt]]
    assert sum(lab == tok.eos_token_id for lab in labels) == len(ANSWERS[fmt])

    all_ids, all_labels = tokenize_conversation(tok, conv.messages, train_on_prompt=True)
    assert all_ids == ids and all_labels == ids


def test_eos_is_trained_in_packed_blocks_when_pad_equals_eos(tok):
    t = copy.deepcopy(tok)
    t.pad_token = t.eos_token  # trl #1623: masking by pad id would also mask every EOS
    rows = [ROWS["messages"]] * 3
    n = len(tokenize_conversation(t, load_conversations(rows[:1])[0].messages)[0])
    data = prepare_sft_data(rows, t, SFTConfig(seq_len=3 * n + 5, eval_fraction=0.0))
    assert data.eval is None and data.stats.conversations_train == 3
    (block,) = data.train.to_list()  # all three conversations packed in one block
    ids, labels, pos = block["input_ids"], block["labels"], block["position_ids"]
    n_real = data.stats.train_tokens
    assert all(i == t.eos_token_id for i in ids[n_real:]) and all(lab == -100 for lab in labels[n_real:])
    assert sum(lab == t.eos_token_id for lab in labels) == 6  # 3 conversations x 2 assistant turns
    assert pos.count(0) == 4  # three conversations and the padding each restart their positions
    assert data.stats.trained_tokens == sum(lab != -100 for lab in labels)


def test_template_without_generation_blocks_is_labelled_by_prefix(tok):
    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    assert ensure_chat_template(t) == "tokenizer"
    msgs = load_conversations([ROWS["messages"]])[0].messages
    ids, labels = tokenize_conversation(t, msgs)
    assert ids == t(t.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    assert trained_runs(t, ids, labels) == [ANSWER + "</s>", "law</s>"]
    assert labels[-1] == -100  # the newline after the last EOS is template, not answer

    t.chat_template = t.chat_template.replace("{{ eos_token }}", "")  # turns closed by no special token
    ids, labels = tokenize_conversation(t, msgs)
    # EOS inserted right after the last answer, and trained; the template's newline stays after it
    assert trained_runs(t, ids, labels) == [ANSWER, "law</s>"] and labels[-1] == -100


def test_template_that_rewrites_history_is_reported(tok):
    t = copy.deepcopy(tok)
    # renders the last turn differently from earlier ones: prefix rendering cannot find the answers
    t.chat_template = "{% for m in messages %}{{ m['content'] + ('!' if loop.last else '.') }}{% endfor %}"
    with pytest.raises(DataError, match=r"row 1: .*renders turn 3 differently"):
        prepare_sft_data([ROWS["messages"]], t, SFTConfig(eval_fraction=0.0))
    t.chat_template = "{% for m in messages %}{{ raise_exception('no system turns') }}{% endfor %}"
    with pytest.raises(DataError, match=r"row 1: the chat template refused this row \(no system turns\)"):
        prepare_sft_data([ROWS["messages"]], t, SFTConfig(eval_fraction=0.0))


def test_malformed_rows_are_reported_with_line_numbers(tmp_path):
    good = ROWS["messages"]
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            good,
            "{not json",
            {"text": "a plain document"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            ROWS["alpaca"],
            "",
            {"messages": [{"role": "user", "content": "only a question"}]},
            good,
        ],
    )
    with pytest.raises(DataError) as err:
        load_conversations(path)
    msg = str(err.value)
    assert "6 malformed row(s)" in msg
    assert f"{path} line 2: not valid JSON" in msg
    assert f"{path} line 3: a row in none of the formats (keys ['text'])" in msg
    assert f"{path} line 4: turn 2: unknown role 'bot'" in msg
    assert f"{path} line 5: turn 2: empty assistant turn" in msg
    assert f"{path} line 6: a row in alpaca format, but {path} is in messages format" in msg
    assert f"{path} line 8: no assistant turn" in msg
    assert "line 1:" not in msg and "line 9:" not in msg

    bad_share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}
    with pytest.raises(DataError, match=r"sg.jsonl line 2: turn 2: unknown role \(from\) 'robot'"):
        load_conversations(write_jsonl(tmp_path / "sg.jsonl", [ROWS["sharegpt"], bad_share]))
    with pytest.raises(DataError, match=r"a sharegpt row has 'conversations'"):
        load_conversations([{"prompt": "p"}], format="sharegpt")


def test_trailing_turns_trimmed_and_long_conversations_dropped(tok):
    rows = [
        {"messages": [*ROWS["messages"]["messages"], {"role": "user", "content": "thanks"}]},
        {
            "messages": [
                {"role": "user", "content": make_text(300, seed=1)},
                {"role": "assistant", "content": "x"},
            ]
        },
        ROWS["messages"],
    ]
    data = prepare_sft_data(rows, tok, SFTConfig(seq_len=128, eval_fraction=0.0))
    assert data.stats.trailing_turns_dropped == 1
    assert data.stats.dropped_too_long == 1 and data.stats.dropped_examples[0].startswith("row 2 (")
    assert data.stats.conversations_train == 2
    with pytest.raises(DataError, match="every conversation is longer than sft.seq_len = 8"):
        prepare_sft_data(rows, tok, SFTConfig(seq_len=8))


def test_split_unpacked_blocks_and_default_template_saved(tok, tmp_path):
    t = copy.deepcopy(tok)
    data = prepare_sft_data(str(TOY), t, SFTConfig(seq_len=128, eval_fraction=0.2, packing=False))
    s = data.stats
    assert s.rows == 52 and (s.conversations_train, s.conversations_eval) == (42, 10)
    assert s.train_blocks == 42 and s.eval_blocks == 10 and len(data.eval_documents) == 10
    assert all(block["position_ids"][0] == 0 for block in data.train.to_list())
    t.save_pretrained(tmp_path / "tok")
    reloaded = load_tokenizer(tmp_path / "tok")
    assert reloaded.chat_template == DEFAULT_CHAT_TEMPLATE
    assert chat_prompt(reloaded, "Hi") == "### User:\nHi\n\n### Assistant:\n"  # BOS left to the tokenizer


def test_yaml_without_a_source_names_the_fix(tmp_path):
    cfg = RunConfig.from_dict(
        {"train": {"output_dir": str(tmp_path / "none")}, "sft": {"data": [str(TOY)]}}, check=False
    )
    with pytest.raises(ConfigError, match="sft.model_or_run: not set, and train.output_dir"):
        sft_from_config(cfg)
    with pytest.raises(ConfigError, match="sft: missing section"):
        sft_from_config(RunConfig())


def test_a_run_directory_is_read_back_through_rundir(tmp_path):
    """A DAPT run is recognised by its adapter; its base comes from run_info.json, its merge from config.yaml."""
    run = RunDir(tmp_path / "dapt").create()
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"))
    with pytest.raises(ConfigError, match="is an adapter directory; pass its run directory"):
        sft(run.adapter_dir, TOY, cfg)
    with pytest.raises(ModelLoadError, match=r"run_info.json is missing or records no base model"):
        sft(run.path, TOY, cfg)
    run.run_info_path.write_text('{"base_model": {"name_or_path"', encoding="utf-8")
    with pytest.raises(RunDirError, match=r"run_info.json is unreadable \(JSONDecodeError"):
        sft(run.path, TOY, cfg)
    run.write_config({"merge": {"dtype": "int4"}})  # read before anything is loaded: a typo fails first
    with pytest.raises(ConfigError, match="merge.dtype"):
        sft(run.path, TOY, cfg)
    assert not (tmp_path / "sft").exists()  # nothing written for a run that could not start


# --------------------------------------------------------------------------------------------------------------
# Training on the tiny model
# --------------------------------------------------------------------------------------------------------------


def test_tiny_model_learns_toy_instructions(tiny_model_dir, tmp_path):
    result = sft(
        tiny_model_dir,
        TOY,
        SFTConfig(output_dir=str(tmp_path / "run"), max_steps=24, warmup_steps=2, **FAST),
        adapter_config=SMALL.replace(r=8, alpha=16),
        eval_config=EvalConfig(general=False),
    )
    before, after = result.before["domain"]["loss"], result.after["domain"]["loss"]
    assert after < before - 2.0, (before, after)  # held-out assistant-token loss
    run = Path(result.output_dir)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_stats"]["chat_template"] == "default"
    assert summary["data_stats"]["conversations_eval"] == 10
    assert load_tokenizer(run / "adapter").chat_template == DEFAULT_CHAT_TEMPLATE

    from peft import PeftModel

    model, tok = load_base_model(tiny_model_dir, quantization="nf4")
    model = PeftModel.from_pretrained(model, str(run / "adapter"))
    tok = load_tokenizer(run / "adapter")
    answer = generate_chat(model, tok, "Which field is the word 'dose' from?", max_new_tokens=12)
    # the answer ends with a learned EOS well before the limit, and holds no template scaffolding
    assert len(tok(answer, add_special_tokens=False).input_ids) < 12 and "###" not in answer


@pytest.fixture(scope="module")
def dapt_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A DAPT run that also trained the embeddings and head (a fast embedding learning rate)."""
    out = tmp_path_factory.mktemp("dapt")
    model, tok = load_base_model(tiny_model_dir, quantization="nf4")
    torch.manual_seed(0)
    model = apply_lora(model, SMALL.replace(train_embeddings=True))
    docs = [
        [tok.bos_token_id, *tok(make_text(60, s), add_special_tokens=False).input_ids, 1] for s in range(6)
    ]
    blocks = Dataset.from_list(pack_documents(docs, 64, tok.pad_token_id))
    cfg = TrainConfig(
        output_dir=str(out),
        max_steps=3,
        learning_rate=1e-2,
        embedding_learning_rate=1e-2,
        gradient_accumulation_steps=1,
    )
    # fully trained embeddings/head at a high learning rate: a bf16 merge would not verify, so float32
    run_config = RunConfig(
        model=ModelConfig(name_or_path=str(tiny_model_dir)), train=cfg, merge=MergeConfig(dtype="float32")
    )
    continued_pretrain(model, tok, blocks, cfg, eval_config=EvalConfig(enabled=False), run_config=run_config)
    return out


def _emb(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    (key,) = [k for k in tensors if "embed_tokens" in k and "lora" not in k]
    return tensors[key].float()


def test_dapt_run_continue_via_yaml_then_merge(dapt_run, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="is an adapter directory; pass its run directory"):
        sft(dapt_run / "adapter", TOY, SFTConfig(output_dir=str(tmp_path / "x")))
    config = {
        "model": {"quantization": "nf4"},
        "adapter": {"r": 16, "gradient_checkpointing": False},  # 'continue' keeps the DAPT adapter's rank
        "train": {"output_dir": str(dapt_run)},  # sft.model_or_run unset: the DAPT run of this file
        "eval": {"general": False},
        "merge": {"dtype": "float32"},
        "sft": {"data": [str(TOY)], "output_dir": str(tmp_path / "sft"), "max_steps": 4, **FAST},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = sft_from_config(RunConfig.from_yaml(tmp_path / "sft.yaml", check=False))
    run = Path(result.output_dir)
    assert result.steps == 4 and result.after["domain"]["loss"] < result.before["domain"]["loss"]
    info = json.loads((run / "run_info.json").read_text())
    assert info["base_model"]["name_or_path"] == str(tiny_model_dir)
    saved = RunConfig.from_yaml(run / "config.yaml", check=False)
    assert saved.sft.model_or_run == str(dapt_run) and saved.model.name_or_path == str(tiny_model_dir)

    dapt = load_file(str(dapt_run / "adapter" / "adapter_model.safetensors"))
    tuned = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert set(tuned) == set(dapt)
    lora_a = next(k for k in tuned if "q_proj.lora_A" in k)
    assert tuned[lora_a].shape[0] == 4 and not torch.equal(tuned[lora_a], dapt[lora_a])
    # the embeddings DAPT trained are kept: SFT starts from them, not from the base's
    base_emb = load_base_model(tiny_model_dir, quantization=None)[0].get_input_embeddings().weight.float()
    assert (_emb(tuned) - _emb(dapt)).norm() < 0.5 * (_emb(tuned) - base_emb).norm()

    merged = merge_run(run)
    assert Path(merged) == RunDir(run).merged_dir and RunDir(run).read_merge_report()["passed"] is True
    assert load_tokenizer(merged).chat_template == DEFAULT_CHAT_TEMPLATE


def test_dapt_run_stack_merge_then_merge(dapt_run, tmp_path):
    result = sft(
        dapt_run,
        TOY,
        SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, stack="merge", **FAST),
        adapter_config=SMALL,
        eval_config=EvalConfig(general=False),
    )
    run = Path(result.output_dir)
    dapt_merged = RunDir(dapt_run).merged_dir
    assert RunDir(dapt_run).read_merge_report()["passed"] is True
    info = json.loads((run / "run_info.json").read_text())["base_model"]
    assert info["name_or_path"] == str(dapt_merged) and info["quantization"] == "nf4"
    tuned = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(".lora_" in k for k in tuned)  # a fresh adapter; DAPT's embeddings live in the merged base

    final = merge_run(run)
    assert Path(final) == RunDir(run).merged_dir and RunDir(run).read_merge_report()["passed"] is True
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    dapt = load_file(str(dapt_run / "adapter" / "adapter_model.safetensors"))
    torch.testing.assert_close(model.get_input_embeddings().weight, _emb(dapt), atol=2e-2, rtol=2e-2)
    # the final model is the DAPT merge with the SFT adapter folded in (merge.dtype float32, inherited)
    stacked = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(dapt_merged, dtype=torch.float32), str(run / "adapter")
    )
    tok = load_tokenizer(final)
    prompt = "Name the field of 'pump'."
    ids = tok(chat_prompt(tok, prompt), return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stacked(ids).logits, atol=1e-4, rtol=1e-4)
    answer = generate_chat(model, tok, prompt, 6)
    assert isinstance(answer, str) and answer == generate_chat(stacked, tok, prompt, 6)
    # a second stack='merge' SFT reuses the DAPT merge it verified (no new merge, same report)
    report_time = (dapt_merged / "merge_report.json").stat().st_mtime_ns
    assert RunDir(dapt_run).has_current_merge()
    sft(
        dapt_run,
        TOY,
        SFTConfig(output_dir=str(tmp_path / "sft2"), max_steps=1, stack="merge", **FAST),
        adapter_config=SMALL,
        eval_config=EvalConfig(enabled=False),
    )
    assert (dapt_merged / "merge_report.json").stat().st_mtime_ns == report_time
