"""evaluate: perplexity and bits/byte checked against NLL computed by hand from the model's logits and
against training's loss; generation, forgetting and the built-in general text."""

from __future__ import annotations

import math

import pytest
import torch

from lora_dapt.config import AdapterConfig
from lora_dapt.errors import DataError
from lora_dapt.evaluate.forgetting import forgetting_report, format_forgetting, general_texts
from lora_dapt.evaluate.generate import generate_samples
from lora_dapt.evaluate.score import (
    EvalResult,
    bits_per_byte,
    evaluate_blocks,
    evaluate_texts,
    perplexity,
    sliding_windows,
)
from lora_dapt.model.load import load_base_model
from lora_dapt.model.lora import apply_lora
from lora_dapt.model.loss import causal_lm_loss_sum
from lora_dapt.planning.memory import peak_memory_bytes

from .conftest import make_text


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")


def ids_of(tok, text: str) -> list[int]:
    """What evaluate_texts scores: BOS (this tokenizer adds it) + text + EOS."""
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    return ids + [tok.eos_token_id]


def token_nlls(model, ids: list[int], context: dict[int, int] | None = None) -> list[float]:
    """NLL of every target ids[t], t >= 1; context[t] = first index the model may see (default 0)."""
    out = []
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for t in range(1, len(ids)):
            start = (context or {}).get(t, 0)
            if start == 0:
                logp = full[t - 1]
            else:
                logp = torch.log_softmax(model(torch.tensor([ids[start : t + 1]])).logits[0, -2].float(), -1)
            out.append(-logp[ids[t]].item())
    return out


def test_sliding_windows_score_each_target_once_with_bounded_context():
    for n in (2, 3, 7, 10, 33, 100):
        for seq_len in (2, 3, 4, 16, 64):
            for stride in (None, 1, 2, 3, 5, 15, 64, 1000):
                windows = sliding_windows(n, seq_len, stride)
                targets = [t for _, end, first in windows for t in range(first, end)]
                assert targets == list(range(1, n)), (n, seq_len, stride)
                step = min(stride or seq_len, seq_len - 1)
                for start, end, first in windows:
                    assert 0 <= start < first < end <= n and end - start <= seq_len
                    # every target after the first window sees at least seq_len - stride tokens
                    if first > 1:
                        assert first - start >= min(seq_len - step, first)


def test_perplexity_is_exp_mean_nll_by_hand(model_tok):
    model, tok = model_tok
    texts = [make_text(40, 1), make_text(25, 2), "Hello world. Ünïcödé ✓"]
    nlls = [x for text in texts for x in token_nlls(model, ids_of(tok, text))]
    result = evaluate_texts(model, tok, texts, seq_len=512, batch_size=2)
    assert result.tokens == len(nlls) == sum(len(ids_of(tok, t)) - 1 for t in texts)
    assert result.loss == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert perplexity(model, tok, texts, seq_len=512) == pytest.approx(result.ppl, rel=1e-6)
    assert 50 < result.ppl < 2000  # a random model over 320 tokens: near the vocabulary size


def test_stride_scores_each_target_once_with_left_context(model_tok):
    model, tok = model_tok
    text = make_text(30, 3)
    ids = ids_of(tok, text)
    seq_len, stride = 12, 5
    assert len(ids) > 4 * seq_len
    # Target t is in the stride-sized chunk k = (t-1) // stride, whose window ends at the chunk's end and
    # reaches seq_len tokens back: so t sees ids[max(0, chunk_end - seq_len):t].
    context = {}
    for t in range(1, len(ids)):
        chunk_end = min(1 + ((t - 1) // stride + 1) * stride, len(ids))
        context[t] = max(0, chunk_end - seq_len)
        assert t - context[t] >= min(seq_len - stride, t)
    nlls = token_nlls(model, ids, context)
    strided = evaluate_texts(model, tok, [text], seq_len=seq_len, stride=stride, batch_size=3)
    assert strided.tokens == len(ids) - 1
    assert strided.loss == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    # Padding in a batch never leaks into real tokens: batch size does not change the number.
    one_by_one = evaluate_texts(model, tok, [text], seq_len=seq_len, stride=stride, batch_size=1)
    assert one_by_one.loss == pytest.approx(strided.loss, rel=1e-5)
    # Context matters: the full-context number is a different one, over the same tokens.
    full = evaluate_texts(model, tok, [text], seq_len=512)
    assert full.tokens == strided.tokens
    assert full.loss != pytest.approx(strided.loss, rel=1e-6)


def test_bits_per_byte_known_case_and_non_ascii_bytes(model_tok):
    # 8 targets of 2 bits each (NLL 2 ln 2) over 16 bytes: exactly 1 bit per byte, perplexity 4.
    r = EvalResult.from_totals(nll=8 * 2 * math.log(2), tokens=8, n_bytes=16)
    assert (r.loss, r.ppl, r.bits_per_byte) == (pytest.approx(2 * math.log(2)), pytest.approx(4.0), 1.0)
    model, tok = model_tok
    texts = ["Ünïcödé ✓ café", make_text(20, 4)]
    n_bytes = len("Ünïcödé ✓ café".encode()) + len(texts[1])
    assert n_bytes > sum(len(t) for t in texts)  # multi-byte characters count as bytes, not characters
    result = evaluate_texts(model, tok, texts, seq_len=512)
    assert result.bytes == n_bytes
    expected = result.loss * result.tokens / math.log(2) / n_bytes
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-9)
    assert bits_per_byte(model, tok, texts, seq_len=512) == pytest.approx(expected, rel=1e-6)


def test_max_tokens_cuts_and_counts_bytes_of_what_was_scored(model_tok):
    model, tok = model_tok
    texts = [make_text(20, 5), make_text(30, 6), make_text(30, 7)]
    first = len(ids_of(tok, texts[0])) - 1
    cut = first + 10
    r = evaluate_texts(model, tok, texts, seq_len=512, max_tokens=cut)
    assert r.tokens == cut
    scored_second = tok.decode(ids_of(tok, texts[1])[1:11])  # ASCII byte-level BPE: decode is exact
    assert texts[1].startswith(scored_second)
    assert r.bytes == len(texts[0]) + len(scored_second)
    nlls = token_nlls(model, ids_of(tok, texts[0])) + token_nlls(model, ids_of(tok, texts[1]))[:10]
    assert r.loss == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)


def test_packed_blocks_score_labels_like_separate_documents(model_tok):
    from datasets import Dataset

    model, tok = model_tok
    a, b, c = (ids_of(tok, make_text(n, s)) for n, s in ((15, 8), (10, 9), (18, 10)))
    # Block 1 packs a and b; b's first token is not a target (it would be predicted across documents).
    # Block 2 is shorter (c alone), so the batch is right-padded.
    rows = {
        "input_ids": [a + b, c],
        "position_ids": [list(range(len(a))) + list(range(len(b))), list(range(len(c)))],
        "labels": [a + [-100] + b[1:], c],
    }
    nlls = token_nlls(model, a) + token_nlls(model, b) + token_nlls(model, c)
    result = evaluate_blocks(model, Dataset.from_dict(rows), batch_size=2)
    assert result.tokens == len(nlls)
    assert result.loss == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result.bits_per_byte is None and result.bytes is None
    with_bytes = evaluate_blocks(model, Dataset.from_dict({**rows, "bytes": [100, 50]}), batch_size=1)
    assert with_bytes.bits_per_byte == pytest.approx(sum(nlls) / math.log(2) / 150, rel=1e-5)
    assert perplexity(model, tok, Dataset.from_dict(rows)) == pytest.approx(result.ppl, rel=1e-6)
    only_first = evaluate_blocks(model, Dataset.from_dict(rows), max_blocks=1)
    assert only_first.tokens == len(a) - 1 + len(b) - 1


def packed_rows(tok) -> dict[str, list[list[int]]]:
    """Two packed blocks of unequal length: one with two documents (the second's first token masked), one
    with a document whose first half is masked like an SFT prompt."""
    a, b, c = (ids_of(tok, make_text(n, s)) for n, s in ((14, 21), (9, 22), (20, 23)))
    return {
        "input_ids": [a + b, c],
        "position_ids": [list(range(len(a))) + list(range(len(b))), list(range(len(c)))],
        "labels": [a + [-100] + b[1:], [-100] * (len(c) // 2) + c[len(c) // 2 :]],
    }


@pytest.mark.parametrize("adapter", [False, True], ids=["plain", "peft"])
def test_eval_loss_is_the_training_loss_on_the_same_blocks(tiny_model_dir, adapter):
    from datasets import Dataset

    model, tok = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    if adapter:  # a LoRA that changes the forward pass, so the test sees the adapter
        model = apply_lora(model, AdapterConfig(r=4, alpha=32, dropout=0.0, init_lora_weights=False))
    rows = packed_rows(tok)
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, pos, labels in zip(rows["input_ids"], rows["position_ids"], rows["labels"], strict=True):
            loss_sum, count = causal_lm_loss_sum(
                model, torch.tensor([ids]), torch.tensor([labels]), torch.tensor([pos])
            )
            total, n = total + float(loss_sum), n + count
    assert n == sum(sum(x != -100 for x in labels[1:]) for labels in rows["labels"])
    result = evaluate_blocks(model, Dataset.from_dict(rows), batch_size=2)  # padded into one batch
    assert result.tokens == n
    assert result.loss == pytest.approx(total / n, rel=1e-6)
    # ... and both are the NLL of the labelled tokens, as the model's own logits give it.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([rows["input_ids"][1]])).logits[0, :-1].float()
        c_total, c_n = causal_lm_loss_sum(
            model, torch.tensor([rows["input_ids"][1]]), torch.tensor([rows["labels"][1]])
        )
    target = torch.tensor(rows["labels"][1][1:])
    keep = target != -100
    by_hand = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
    assert float(c_total) == pytest.approx(by_hand, rel=1e-5) and c_n == int(keep.sum())


def test_perplexity_dispatches_files_globs_and_text_datasets(model_tok, tmp_path):
    from datasets import Dataset

    model, tok = model_tok
    texts = [make_text(20, 11), make_text(12, 12)]
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t, encoding="utf-8")
    expected = perplexity(model, tok, texts, seq_len=64)
    assert perplexity(model, tok, str(tmp_path / "*.txt"), seq_len=64) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, tok, tmp_path, seq_len=64) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, tok, [tmp_path / "d0.txt", tmp_path / "d1.txt"], seq_len=64) == pytest.approx(
        expected, rel=1e-6
    )
    ds = Dataset.from_dict({"text": texts})
    assert perplexity(model, tok, ds, seq_len=64) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DataError, match="no such file"):
        perplexity(model, tok, str(tmp_path / "missing*.md"))
    with pytest.raises(DataError, match="input_ids or a text column"):
        perplexity(model, tok, Dataset.from_dict({"body": texts}))
    with pytest.raises(DataError, match=r"nothing to evaluate \(0 texts gave no target tokens\)"):
        evaluate_texts(model, tok, [], seq_len=64)


def test_peft_model_matches_base_at_init_and_restores_training_mode(tiny_model_dir):
    texts = [make_text(30, 13)]
    base, tok = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    base_ppl = perplexity(base, tok, texts)
    noop = apply_lora(base, AdapterConfig(r=4, alpha=8, dropout=0.0))  # B = 0: adapter is a no-op
    noop.train()
    assert perplexity(noop, tok, texts) == pytest.approx(base_ppl, rel=1e-5)
    assert noop.training  # evaluation put it back in training mode

    model, tok = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    active = apply_lora(model, AdapterConfig(r=4, alpha=64, dropout=0.3, init_lora_weights=False))
    active.train()
    first = perplexity(active, tok, texts)
    assert first != pytest.approx(base_ppl, rel=1e-4)  # the adapter is really in the forward pass
    assert perplexity(active, tok, texts) == first  # eval mode: dropout off, deterministic


def test_4bit_model(tiny_model_dir, model_tok):
    model, tok = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype="float32")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    texts = [make_text(30, 14)]
    result = evaluate_texts(model, tok, texts, seq_len=32, stride=16)
    full_precision = evaluate_texts(model_tok[0], tok, texts, seq_len=32, stride=16)
    assert result.tokens == full_precision.tokens
    assert math.isfinite(result.loss)
    assert result.loss == pytest.approx(full_precision.loss, rel=0.02)  # NF4 rounding, same model


def test_generate_samples_greedy_and_deterministic(model_tok):
    model, tok = model_tok
    model.train()
    first = generate_samples(model, tok, ["the patient", "contract clause"], max_new_tokens=6)
    again = generate_samples(model, tok, ["the patient", "contract clause"], max_new_tokens=6)
    assert first == again and model.training
    assert [s["prompt"] for s in first] == ["the patient", "contract clause"]
    assert all(1 <= s["new_tokens"] <= 6 and isinstance(s["completion"], str) for s in first)
    model.eval()


def test_generate_chat_is_the_greedy_generator_on_the_chat_prompt(tiny_model_dir):
    from lora_dapt.data.chat import chat_prompt, ensure_chat_template
    from lora_dapt.evaluate.generate import generate_chat

    model, tok = load_base_model(tiny_model_dir, quantization=None, compute_dtype="float32")
    ensure_chat_template(tok)
    model.train()
    answer = generate_chat(model, tok, "Which field is 'dose' from?", max_new_tokens=8)
    assert model.training  # eval mode only while generating
    (sample,) = generate_samples(
        model, tok, [chat_prompt(tok, "Which field is 'dose' from?")], max_new_tokens=8
    )
    assert answer == sample["completion"] and 1 <= sample["new_tokens"] <= 8
    assert "### Assistant" not in answer  # only the new tokens are decoded


def test_forgetting_report_and_table():
    before = {"domain": {"ppl": 20.0, "bits_per_byte": 2.0}, "general": EvalResult.from_totals(10.0, 10, 20)}
    after = {"domain": {"ppl": 15.0, "bits_per_byte": 1.5}, "general": 11.0, "samples": [{"prompt": "x"}]}
    report = forgetting_report(before, after)
    assert list(report) == ["domain", "general"]  # "samples" is not a split
    assert report["domain"]["ppl_change"] == pytest.approx(-0.25)
    assert report["domain"]["bpb_change"] == pytest.approx(-0.25)
    assert report["general"]["ppl_before"] == pytest.approx(math.e)
    assert report["general"]["ppl_change"] == pytest.approx(11.0 / math.e - 1)
    assert report["general"]["bpb_after"] is None and report["general"]["bpb_change"] is None
    table = format_forgetting(report).splitlines()
    assert table[0].split()[:3] == ["split", "ppl", "before"]
    assert table[1].split() == ["domain", "20.00", "15.00", "-25.0%", "2.0000", "1.5000"]
    assert table[2].split()[:4] == ["general", "2.72", "11.00", "+304.7%"]
    assert len({len(line) for line in table[:2]}) == 1  # aligned columns
    # A run stopped before the after-eval: a report with gaps, no crash.
    partial = forgetting_report(before, {})
    assert partial["domain"]["ppl_after"] is None and partial["domain"]["ppl_change"] is None
    partial_table = format_forgetting(partial).splitlines()
    assert partial_table[1].split() == ["domain", "20.00", "-", "-", "2.0000", "-"]
    assert partial_table[2].split() == ["general", "2.72", "-", "-", f"{10 / math.log(2) / 20:.4f}", "-"]


# Measured on the tuple the built-in sample was before it became package data (git show
# 4700ea2:lora_dapt/evaluate/forgetting.py): 12 texts, 5,699 characters, and the sha256 of json.dumps(texts).
BUILTIN_TEXTS, BUILTIN_CHARS = 12, 5699
BUILTIN_SHA256 = "c9993aa7f34151539998b235d9ef13766bc0438516ce10992701146d7c5df52a"


def test_general_texts_builtin_is_the_shipped_sample_unchanged():
    import hashlib
    import json

    builtin = general_texts()
    assert len(builtin) == BUILTIN_TEXTS and sum(len(t) for t in builtin) == BUILTIN_CHARS
    assert round(BUILTIN_CHARS, -2) == 5700  # the docstring's "twelve ... about 5,700 characters"
    assert (
        "twelve short paragraphs" in general_texts.__doc__
        and "about 5,700 characters" in general_texts.__doc__
    )
    assert hashlib.sha256(json.dumps(builtin).encode()).hexdigest() == BUILTIN_SHA256
    assert all(t == t.strip() and "\n" not in t for t in builtin)  # one paragraph each, no stray whitespace
    assert general_texts() is not builtin and general_texts() == builtin  # a fresh list: callers may edit it


def test_general_texts_builtin_and_sources(tmp_path):
    builtin = general_texts()
    assert len(builtin) == BUILTIN_TEXTS and all(t.strip() for t in builtin)
    assert not any("def " in t or "import " in t or ">>>" in t for t in builtin)  # prose, not code
    short = general_texts(max_chars=1000)
    assert sum(len(t) for t in short) == 1000
    (tmp_path / "g.md").write_text("General text here.", encoding="utf-8")
    assert general_texts([str(tmp_path / "*.md")]) == ["General text here."]
    with pytest.raises(DataError):
        general_texts([str(tmp_path / "nope.txt")])


def test_peak_memory_is_at_least_current_rss():
    import psutil

    peak = peak_memory_bytes("cpu")
    assert peak >= 0.9 * psutil.Process().memory_info().rss
    if torch.cuda.is_available():  # the default device is CUDA: its allocator's peak
        assert peak_memory_bytes() == torch.cuda.max_memory_allocated()
    else:  # the default is the CPU, and a peak never falls
        assert peak_memory_bytes() >= peak
