"""lora_dapt.data (corpus side): nothing lost, nothing leaked, every bad input reported; one resolver."""

from __future__ import annotations

import codecs
import doctest
import json
import os
from collections import Counter

import datasets
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_dapt.config import DataConfig
from lora_dapt.data import clean, formats, resolve, sources
from lora_dapt.data.corpus import Corpus, CorpusStats, format_stats, prepare_corpus, resolve_special_tokens
from lora_dapt.data.formats import Utf8Decoder, json_rows, jsonl_rows
from lora_dapt.data.packing import IGNORE_INDEX, segment_ids
from lora_dapt.data.sources import read_text_sources, resolve_path
from lora_dapt.errors import DataError

from .conftest import make_text

BOS, EOS = 0, 1


def cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("seq_len", 64)
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def doc_tokens(tok, text: str) -> list[int]:
    return [BOS] + tok(text, add_special_tokens=False).input_ids + [EOS]


def all_tokens(c: Corpus) -> Counter:
    out: Counter = Counter()
    for ds in (c.train, c.eval):
        if ds is not None:
            for row in ds["input_ids"]:
                out.update(row)
    return out


def pieces(ds: datasets.Dataset) -> list[tuple[int, ...]]:
    """Non-padding segments of every block (a padding segment is all -100 labels at the block's end)."""
    out = []
    for ids, pos, lab in zip(ds["input_ids"], ds["position_ids"], ds["labels"], strict=True):
        seg = segment_ids(pos)
        for s in sorted(set(seg)):
            idx = [t for t, x in enumerate(seg) if x == s]
            out.append((tuple(ids[t] for t in idx), tuple(lab[t] for t in idx)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The invariant: tokens in == tokens out, and no document in both splits
# ---------------------------------------------------------------------------------------------------------------

WORDS = st.sampled_from("alpha beta gamma dose renal tablet court appeal valve pump the a of".split())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.lists(WORDS, min_size=1, max_size=90).map(" ".join), min_size=2, max_size=12, unique=True
    ),
    seq_len=st.integers(4, 48),
    eval_fraction=st.sampled_from([0.0, 0.25, 0.5]),
)
def test_property_no_token_lost_and_split_by_document(
    tmp_path, tiny_tokenizer, texts, seq_len, eval_fraction
):
    c = prepare_corpus(
        [texts], tiny_tokenizer, cfg(tmp_path, seq_len=seq_len, eval_fraction=eval_fraction), use_cache=False
    )
    expected: Counter = Counter()
    for t in texts:
        expected.update(doc_tokens(tiny_tokenizer, t))
    got = all_tokens(c)
    pad = EOS  # the tiny tokenizer has no pad token: EOS pads, masked by position
    got[pad] -= c.stats.padding_tokens
    assert +got == expected
    assert c.stats.documents_kept == len(texts)
    assert c.stats.train_tokens + c.stats.eval_tokens == sum(expected.values())
    assert (c.stats.train_blocks + c.stats.eval_blocks) * seq_len == c.stats.tokens + c.stats.padding_tokens
    for ds in (c.train, c.eval):
        if ds is not None:
            assert all(len(r) == seq_len for col in ("input_ids", "position_ids", "labels") for r in ds[col])
    # the split is by document: eval blocks hold exactly the eval documents' tokens, train blocks the rest
    assert c.stats.eval_documents == len(c.eval_documents)
    held = list(c.eval_documents)
    assert len(set(held)) == len(held) and set(held) <= set(texts)
    for ds, docs, n_tokens in (
        (c.train, [t for t in texts if t not in held], c.stats.train_tokens),
        (c.eval, held, c.stats.eval_tokens),
    ):
        want: Counter = Counter()
        for t in docs:
            want.update(doc_tokens(tiny_tokenizer, t))
        have: Counter = Counter()
        for row in ds["input_ids"] if ds is not None else []:
            have.update(row)
        have[pad] -= (len(ds) if ds is not None else 0) * seq_len - n_tokens
        assert +have == want
    if eval_fraction:
        assert len(held) == min(max(round(eval_fraction * len(texts)), 1), len(texts) - 1)
    else:
        assert c.eval is None and held == []


def test_labels_mask_document_starts_and_padding_but_not_eos(tmp_path, tiny_tokenizer):
    texts = [make_text(n, s) for s, n in enumerate([3, 5, 8, 2, 13])]
    c = prepare_corpus([texts], tiny_tokenizer, cfg(tmp_path, seq_len=128), use_cache=False)
    assert c.stats.train_blocks == 1 and c.stats.padding_tokens > 0
    for ids, lab in pieces(c.train):
        if ids[0] == BOS:  # a document: first token masked, everything else (EOS too) trained
            assert lab[0] == IGNORE_INDEX and list(lab[1:]) == list(ids[1:]) and ids[-1] == EOS
        else:  # the padding segment: all masked although its id is EOS
            assert set(ids) == {EOS} and set(lab) == {IGNORE_INDEX}
    assert sum(1 for ids, _ in pieces(c.train) if ids[0] == BOS) == 5


# ---------------------------------------------------------------------------------------------------------------
# Cross-document isolation on the tiny model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_document_logits_equal_document_alone(tmp_path, tiny_model_dir, tiny_tokenizer, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    model.config.use_cache = False  # transformers only detects packing without a KV cache
    texts = [make_text(n, 50 + n) for n in (6, 11, 4, 9, 7)]
    c = prepare_corpus([texts], tiny_tokenizer, cfg(tmp_path, seq_len=160), use_cache=False)
    assert c.stats.train_blocks == 1
    row = c.train[0]
    ids = torch.tensor([row["input_ids"]])
    pos = torch.tensor([row["position_ids"]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        unpacked = model(input_ids=ids).logits[0]  # control: plain causal attention over the whole block
    seg = segment_ids(row["position_ids"])
    checked = 0
    leaked = False
    for s in sorted(set(seg)):
        idx = [t for t, x in enumerate(seg) if x == s]
        if row["input_ids"][idx[0]] != BOS:
            continue  # padding
        alone_ids = torch.tensor([[row["input_ids"][t] for t in idx]])
        with torch.no_grad():
            alone = model(input_ids=alone_ids).logits[0]
        torch.testing.assert_close(packed[idx], alone, atol=1e-4, rtol=1e-4)
        leaked |= idx[0] > 0 and not torch.allclose(unpacked[idx], alone, atol=1e-4)
        checked += 1
    assert checked == 5
    assert leaked  # without position_ids the same block does mix documents: the check above can fail

    # and the loss the trainer sees is finite and uses only the labelled tokens
    labels = torch.tensor([row["labels"]])
    out = model(input_ids=ids, position_ids=pos, labels=labels)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------
# Long documents, cleaning filters
# ---------------------------------------------------------------------------------------------------------------


def test_long_document_is_split_not_truncated(tmp_path, tiny_tokenizer):
    text = make_text(1500, 3)
    n = len(doc_tokens(tiny_tokenizer, text))
    c = prepare_corpus([[text]], tiny_tokenizer, cfg(tmp_path, seq_len=32), use_cache=False)
    assert n > 32 * 10
    assert c.stats.train_tokens == n
    assert c.stats.continuation_pieces == -(-n // 32) - 1
    assert c.stats.train_blocks == -(-n // 32)
    assert c.stats.padding_tokens == c.stats.train_blocks * 32 - n
    flat = [x for b in c.train["input_ids"] for x in b]
    assert Counter(flat) - Counter({EOS: c.stats.padding_tokens}) == Counter(doc_tokens(tiny_tokenizer, text))


def test_cleaning_filters_are_counted(tmp_path, tiny_tokenizer):
    base = make_text(300, 7)
    near = base.replace("patient", "PATIENT", 1) if "patient" in base else base + " extra"
    texts = [
        base,
        base,  # exact duplicate
        near,  # near duplicate
        "   \n\t ",  # empty after cleaning
        "tiny",  # too short
        "Cafe\u0301  \r\nline two  ",  # normalised (NFC, CRLF, trailing spaces)
        make_text(80, 8),
    ]
    c = prepare_corpus(
        [texts], tiny_tokenizer, cfg(tmp_path, min_chars=10, near_dedupe=True), use_cache=False
    )
    s = c.stats
    assert s.documents_read == 7
    assert s.dropped == {"empty": 1, "too_short": 1, "duplicate": 1, "near_duplicate": 1, "in_eval": 0}
    assert s.documents_kept == 3
    assert s.normalized == 2  # the blank document (stripped) and the Cafe one; make_text needs no change
    assert "dropped near duplicates: 1" in s.summary()

    off = prepare_corpus([texts], tiny_tokenizer, cfg(tmp_path, min_chars=0, dedupe=False), use_cache=False)
    assert off.stats.dropped["duplicate"] == off.stats.dropped["near_duplicate"] == 0
    assert off.stats.documents_kept == 6  # only the empty one goes

    raw = prepare_corpus([["a  \r\nb"]], tiny_tokenizer, cfg(tmp_path, normalize=False), use_cache=False)
    assert raw.stats.normalized == 0
    assert raw.stats.train_tokens == len(doc_tokens(tiny_tokenizer, "a  \r\nb"))


def test_near_dedupe_threshold(tmp_path, tiny_tokenizer):
    a = make_text(200, 1)
    words = a.split()
    b = " ".join(words[:150] + ["valve"] * 50)  # ~60% similar
    strict = prepare_corpus(
        [[a, b]], tiny_tokenizer, cfg(tmp_path, near_dedupe=True, near_dedupe_threshold=0.9), use_cache=False
    )
    loose = prepare_corpus(
        [[a, b]], tiny_tokenizer, cfg(tmp_path, near_dedupe=True, near_dedupe_threshold=0.3), use_cache=False
    )
    assert strict.stats.dropped["near_duplicate"] == 0
    assert loose.stats.dropped["near_duplicate"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Sources and bad inputs
# ---------------------------------------------------------------------------------------------------------------


def test_directory_of_files_with_bad_inputs(tmp_path, tiny_tokenizer, domain_files):
    d = domain_files[0].parent
    sub = d / "nested" / "deeper"
    sub.mkdir(parents=True)
    (sub / "deep.md").write_text(make_text(30, 77))
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x89PNG\x00\x00\x01\x02" * 10)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e and more text".encode("latin-1"))
    (d / "notes.docx").write_bytes(b"PK\x03\x04")
    (d / "corrupt.parquet").write_bytes(b"not a parquet file at all")
    os.symlink(d / "missing-target.txt", d / "dangling.txt")
    (d / ".hidden.txt").write_text("secret")
    c = prepare_corpus(
        [str(d), str(tmp_path / "nope" / "*.txt")],
        tiny_tokenizer,
        cfg(tmp_path, eval_fraction=0.2),
        use_cache=False,
    )
    s = c.stats
    assert s.problems["binary"] == 1 and s.examples["binary"] == [str(d / "binary.txt")]
    assert s.problems["undecodable"] == 1 and s.examples["undecodable"] == [str(d / "latin1.txt")]
    assert s.problems["unknown_extension"] == 1 and s.examples["unknown_extension"] == [str(d / "notes.docx")]
    assert s.problems["unreadable"] == 2
    assert sorted(e.split(" (")[0] for e in s.examples["unreadable"]) == [
        str(d / "corrupt.parquet"),
        str(d / "dangling.txt"),
    ]
    assert s.problems["not_found"] == 1 and s.problems["hidden"] == 1
    assert s.dropped["empty"] == 1 and s.examples["empty"] == [str(d / "empty.txt")]
    assert s.documents_kept == 12 + 1 + 1  # the domain files, the nested .md, the latin-1 file (kept, named)
    assert s.train_documents + s.eval_documents == 14 and s.eval_documents == 3
    lines = format_stats(s).splitlines()
    for line in (
        f"binary files (skipped): 1 (e.g. {d / 'binary.txt'})",
        f"files with undecodable bytes (replaced by U+FFFD, kept): 1 (e.g. {d / 'latin1.txt'})",
        "files with an unknown extension (skipped; read one as text with data.extensions: ['+.ext']): 1 "
        f"(e.g. {d / 'notes.docx'})",
        f"  dropped empty: 1 (e.g. {d / 'empty.txt'})",
        f"hidden files/directories (skipped): 1 (e.g. {d / '.hidden.txt'})",
        f"sources that matched no file: 1 (e.g. {tmp_path / 'nope' / '*.txt'})",
    ):
        assert line in lines


def test_huge_single_line_is_cut_into_parts(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(sources, "_PART_CHARS", 500)
    monkeypatch.setattr(formats, "_READ_BYTES", 300)
    line = make_text(1000, 5)  # ~6000 characters, no newline
    (tmp_path / "huge.txt").write_text(line)
    c = prepare_corpus([str(tmp_path / "huge.txt")], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    parts = [p for p, _ in sources._cut_parts([line])]
    assert "".join(parts) == line and len(parts) >= 10
    assert all(
        250 <= len(p) <= 501 for p in parts[:-1]
    )  # cut at a space between _PART_CHARS/2 and _PART_CHARS
    assert s.problems["split"] == 1 and s.examples["split"] == [str(tmp_path / "huge.txt")]
    assert s.documents_read == len(parts)
    assert s.characters == len(line) - (s.documents_read - 1)  # parts are cut after a space, stripped
    got = all_tokens(c)
    got[EOS] -= s.padding_tokens
    assert got[BOS] == 1 and got[EOS] == 1  # one document: BOS on the first part, EOS on the last


def test_table_formats_and_text_field(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [make_text(20 + i, 300 + i) for i in range(8)]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": t}) for t in texts[:2]) + '\n{"other": 1}\nnot json\n\n'
    )
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"body": t} for t in texts[2:4]]}))
    (tmp_path / "c.csv").write_text("id,body\n1," + texts[4] + "\n2," + texts[5] + "\n")
    pq.write_table(pa.table({"body": texts[6:8]}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"wrong": ["x"]}), tmp_path / "e.parquet")
    c = prepare_corpus(
        [str(tmp_path / "*.*")], tiny_tokenizer, cfg(tmp_path, text_field="body"), use_cache=False
    )
    assert c.stats.documents_kept == 8
    # {"other": 1} and the parquet without 'body'; "not json" is reported as invalid JSON, with its line
    assert c.stats.problems["bad_rows"] == 2 and c.stats.problems["invalid_json"] == 1
    assert c.stats.examples["invalid_json"] == [
        f"{tmp_path / 'a.jsonl'} (1 rows: {tmp_path / 'a.jsonl'}:4: not valid JSON (Expecting value))"
    ]
    assert c.stats.files_read == 5
    expected = sum(len(doc_tokens(tiny_tokenizer, t)) for t in texts)
    assert c.stats.train_tokens == expected


def test_datasets_and_texts_as_sources(tmp_path, tiny_tokenizer):
    texts = [make_text(30, i) for i in range(6)]
    ds = datasets.Dataset.from_dict({"text": texts[:3]})
    it = datasets.Dataset.from_dict({"text": texts[3:5]}).to_iterable_dataset()
    c = prepare_corpus([ds, it, [texts[5]]], tiny_tokenizer, cfg(tmp_path))
    assert c.stats.documents_kept == 6
    assert c.stats.train_tokens == sum(len(doc_tokens(tiny_tokenizer, t)) for t in texts)
    wrong = datasets.Dataset.from_dict({"content": texts})
    with pytest.raises(DataError, match="no training documents left.*content"):
        prepare_corpus(wrong, tiny_tokenizer, cfg(tmp_path))
    with pytest.raises(DataError, match="source #0 is a int"):
        prepare_corpus([3], tiny_tokenizer, cfg(tmp_path))


def test_empty_corpus_error_names_what_happened(tmp_path, tiny_tokenizer):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        prepare_corpus([str(tmp_path / "*.txt")], tiny_tokenizer, cfg(tmp_path, min_chars=5))
    msg = str(e.value)
    assert (
        "3 files read" in msg
        and "2 empty" in msg
        and "1 shorter than min_chars" in msg
        and "min_chars" in msg
    )


def test_eval_sources_hold_out_and_decontaminate(tmp_path, tiny_tokenizer, domain_files):
    held = tmp_path / "held"
    held.mkdir()
    (held / "e1.txt").write_text(domain_files[0].read_text())  # also in the training files
    (held / "e2.txt").write_text(make_text(50, 999))
    c = prepare_corpus(
        [str(p) for p in domain_files],
        tiny_tokenizer,
        cfg(tmp_path, eval_fraction=0.5, eval_sources=[str(held)]),
    )
    assert c.stats.dropped["in_eval"] == 1 and c.stats.examples["in_eval"] == [str(domain_files[0])]
    assert c.stats.train_documents == 11 and c.stats.eval_documents == 2
    assert sorted(c.eval_documents) == sorted([domain_files[0].read_text(), make_text(50, 999)])


def test_split_is_seeded_and_by_document(tmp_path, tiny_tokenizer, domain_files):
    srcs = [str(p) for p in domain_files]
    a = prepare_corpus(srcs, tiny_tokenizer, cfg(tmp_path, eval_fraction=0.25, seed=1), use_cache=False)
    b = prepare_corpus(srcs, tiny_tokenizer, cfg(tmp_path, eval_fraction=0.25, seed=1), use_cache=False)
    other = prepare_corpus(srcs, tiny_tokenizer, cfg(tmp_path, eval_fraction=0.25, seed=2), use_cache=False)
    assert a.eval_documents == b.eval_documents and len(a.eval_documents) == 3
    assert a.train["input_ids"] == b.train["input_ids"]
    assert set(a.eval_documents) != set(other.eval_documents)


def test_replay_fraction_is_met_and_deterministic(tmp_path, tiny_tokenizer, domain_files):
    general = [make_text(60, 5000 + i) for i in range(40)]
    config = cfg(tmp_path, replay_fraction=0.2, replay_sources=["unused"])
    a = prepare_corpus([str(p) for p in domain_files], tiny_tokenizer, config, replay_sources=[general])
    b = prepare_corpus(
        [str(p) for p in domain_files], tiny_tokenizer, config, replay_sources=[general], use_cache=False
    )
    s = a.stats
    domain = s.train_tokens - s.replay_tokens
    assert s.replay_tokens == -(-domain * 2 // 8)  # ceil(domain * 0.2 / 0.8)
    assert abs(s.replay_fraction - 0.2) < 0.01
    assert 0 < s.replay_documents < 40
    assert a.train["input_ids"] == b.train["input_ids"]
    assert "replay:" in s.summary() and f"{s.replay_tokens:,} tokens" in s.summary()
    none = prepare_corpus([str(p) for p in domain_files], tiny_tokenizer, cfg(tmp_path))
    assert none.stats.replay_tokens == 0 and none.stats.train_tokens == domain


def test_cache_is_reused_and_invalidated(tmp_path, tiny_tokenizer, domain_files):
    srcs = [str(p) for p in domain_files]
    first = prepare_corpus(srcs, tiny_tokenizer, cfg(tmp_path))
    again = prepare_corpus(srcs, tiny_tokenizer, cfg(tmp_path))
    assert not first.stats.cached and again.stats.cached
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.stats.train_tokens == first.stats.train_tokens
    domain_files[3].write_text(make_text(10, 1))
    changed = prepare_corpus(srcs, tiny_tokenizer, cfg(tmp_path))
    assert not changed.stats.cached and changed.stats.train_tokens != first.stats.train_tokens
    other_len = prepare_corpus(srcs, tiny_tokenizer, cfg(tmp_path, seq_len=32))
    assert not other_len.stats.cached


def test_bos_follows_the_tokenizer_unless_told(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    assert tiny_tokenizer("x").input_ids[0] == BOS  # the tiny tokenizer adds BOS by itself (like Llama)
    assert resolve_special_tokens(tiny_tokenizer, DataConfig()) == (BOS, EOS)
    no_bos = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    no_bos.add_bos_token = False  # like GPT-2: BOS exists but is not added
    assert no_bos("x").input_ids[0] != BOS
    assert resolve_special_tokens(no_bos, DataConfig()) == (None, EOS)
    assert resolve_special_tokens(tiny_tokenizer, DataConfig(add_bos=True)) == (BOS, EOS)
    assert resolve_special_tokens(tiny_tokenizer, DataConfig(add_bos=False, add_eos=False)) == (None, None)
    c = prepare_corpus([["one two three"]], tiny_tokenizer, cfg(tmp_path, add_bos=False), use_cache=False)
    assert (
        c.stats.train_tokens == len(tiny_tokenizer("one two three", add_special_tokens=False).input_ids) + 1
    )
    assert c.stats.special_tokens == 1 and not c.stats.add_bos
    gpt2_like = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    gpt2_like.bos_token = None
    with pytest.raises(DataError, match="no BOS token"):
        resolve_special_tokens(gpt2_like, DataConfig(add_bos=True))


def test_stats_round_trip():
    s = CorpusStats(documents_read=3, dropped={"empty": 1}, seq_len=8)
    assert CorpusStats.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert "documents read:    3" in s.summary() and "dropped empty: 1" in s.summary()


def test_gaps_left_by_long_documents_are_filled_and_counted(tmp_path, tiny_tokenizer, monkeypatch):
    # documents longer than a block whose last pieces (36-60 tokens of 64) cannot share a block: plain
    # best-fit decreasing leaves a gap after each
    texts = []
    for n in range(100, 400):
        text = make_text(n, 900 + n)
        if 36 <= (len(doc_tokens(tiny_tokenizer, text)) % 64) <= 60:
            texts.append(text)
        if len(texts) == 8:
            break

    def prepare(tag: str):
        return prepare_corpus([texts], tiny_tokenizer, cfg(tmp_path / tag, seq_len=64), use_cache=False)

    filled = prepare("filled")
    s = filled.stats
    assert s.gap_fill_cuts > 0
    assert f"(+{s.gap_fill_cuts} cut to fill block gaps)" in s.summary()
    # every cut starts a segment whose first token is an input but not a target: the count is exact
    targets = sum(sum(1 for x in row if x != IGNORE_INDEX) for row in filled.train["labels"])
    assert targets == s.train_tokens - s.train_documents - s.continuation_pieces - s.gap_fill_cuts
    monkeypatch.setattr(
        "lora_dapt.data.packing._fill_gaps", lambda bins, *a: bins
    )  # plain best-fit decreasing
    plain = prepare("plain")
    assert plain.stats.gap_fill_cuts == 0 and plain.stats.train_tokens == s.train_tokens
    assert s.padding_tokens < plain.stats.padding_tokens and s.train_blocks < plain.stats.train_blocks
    assert s.padding_tokens < 64  # less than one block of padding is left


# ---------------------------------------------------------------------------------------------------------------
# The resolver, the readers, counts that come back from worker processes
# ---------------------------------------------------------------------------------------------------------------


def test_docstring_examples_hold():
    for module in (clean, formats, sources, resolve):
        result = doctest.testmod(module)
        assert result.attempted >= 1 and result.failed == 0, module.__name__


def test_resolver_rules(tmp_path, monkeypatch):
    d = tmp_path / "d"
    (d / "a-sub").mkdir(parents=True)
    (d / ".git").mkdir()
    for name in ("b.txt", "a-sub/x.md", "c.JSONL", ".hidden.txt", ".git/HEAD.txt", "e.docx"):
        (d / name).write_text("x")
    r = resolve_path(d)
    # a directory's own files (name order) come before its sub-directories'
    assert r.kind == "directory" and r.files == [
        str(d / n) for n in ("b.txt", "c.JSONL", "e.docx", "a-sub/x.md")
    ]
    assert sorted((s.name, s.kind, s.detail) for s in r.skipped) == [
        (str(d / ".git"), "hidden", "hidden directory"),
        (str(d / ".hidden.txt"), "hidden", "hidden file"),
    ]
    assert resolve_path(d, (".txt", ".jsonl")).files == [str(d / "b.txt"), str(d / "c.JSONL")]
    assert resolve_path(str(d / "e.docx"), (".txt",)).files == [str(d / "e.docx")]  # named: taken as is
    glob = resolve_path(str(d / "**" / "*.md"))
    assert (glob.kind, glob.files, glob.skipped) == ("glob", [str(d / "a-sub" / "x.md")], [])
    none = resolve_path(str(d / "*.csv"))
    assert (none.kind, none.files, [(s.name, s.kind, s.detail) for s in none.skipped]) == (
        "glob",
        [],
        [(str(d / "*.csv"), "not_found", "the glob matched no file")],
    )
    missing = resolve_path(d / "nope.txt")
    assert (missing.kind, [s.detail for s in missing.skipped]) == ("missing", ["no such file or directory"])
    (d / "odd[1].txt").write_text("x")  # an existing path is itself, even with glob characters
    assert resolve_path(str(d / "odd[1].txt")).files == [str(d / "odd[1].txt")]
    monkeypatch.setenv("HOME", str(d))
    assert resolve_path("~/b.txt").files == [str(d / "b.txt")]


def test_read_text_sources_is_strict(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "s" / "b.md").write_text("B")
    (tmp_path / "s" / "c.json").write_text("{}")  # not a text extension: skipped in a directory
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + b"bom")
    assert read_text_sources([tmp_path / "a.txt", str(tmp_path / "s"), tmp_path / "bom.txt"]) == [
        "A",
        "B",
        "bom",
    ]
    with pytest.raises(
        DataError, match=r"nope\*\.txt: no such file, directory or matching glob.*pass a list"
    ):
        read_text_sources(str(tmp_path / "nope*.txt"))
    (tmp_path / "bad.txt").write_bytes(b"ok \xe9 and \xff")
    with pytest.raises(
        DataError,
        match=r"bad.txt: cannot read as UTF-8 text: invalid continuation byte \(byte 0xe9 at offset 3\); "
        r"2 undecodable sequence\(s\)",
    ):
        read_text_sources(tmp_path / "bad.txt")


_PIECES = [
    b"a",
    b"\n",
    b"\xc3\xa9",
    b"\xe2\x82\xac",
    b"\xf0\x9f\x98\x80",
    b"\xff",
    b"\xe2\x82",
    b"\x80",
    b"\xed\xa0\x80",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join),
    st.booleans(),
    st.lists(st.integers(0, 200), max_size=6),
)
def test_decoder_is_replace_and_counts_each_replacement(body, bom, cuts):
    data = (codecs.BOM_UTF8 if bom else b"") + body
    chunks, at = [], 0
    for c in sorted(min(c, len(data)) for c in cuts) + [len(data)]:
        chunks.append(data[at:c])
        at = c
    dec = Utf8Decoder()
    text = "".join(dec.decode(c) for c in chunks) + dec.decode(b"", final=True)
    assert text == data.decode("utf-8-sig", errors="replace")
    calls = 0
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError:
        rest = data.removeprefix(codecs.BOM_UTF8)
        while rest:  # count the error handler's calls the slow way
            try:
                rest.decode("utf-8")
                break
            except UnicodeDecodeError as e:
                calls += 1
                rest = rest[e.end :]
    assert dec.replaced == calls and (dec.first_error is None) == (calls == 0)


def test_json_readers(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"t": 1}\n\n  \nnot json\n{"t": "caf\xe9"}\n')
    rows = list(jsonl_rows(tmp_path / "a.jsonl"))
    assert [(r.line, r.value, r.error) for r in rows] == [
        (1, {"t": 1}, None),
        (4, None, "not valid JSON (Expecting value)"),
        (5, {"t": "caf\ufffd"}, None),
    ]
    strict = list(jsonl_rows(tmp_path / "a.jsonl", errors="strict"))
    assert strict[2] == (None, 5, None, "not UTF-8 text (invalid continuation byte at byte 11 of the line)")
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"t": 1}, {"t": 2}]}))
    assert [(r.index, r.value) for r in json_rows(tmp_path / "b.json", unwrap=True)] == [
        (0, {"t": 1}),
        (1, {"t": 2}),
    ]
    assert [r.value for r in json_rows(tmp_path / "b.json")] == [{"data": [{"t": 1}, {"t": 2}]}]
    (tmp_path / "c.json").write_text('{"t": 1}\n{"t": 2}\n')  # JSON Lines saved as .json
    assert [(r.line, r.value) for r in json_rows(tmp_path / "c.json")] == [(1, {"t": 1}), (2, {"t": 2})]
    (tmp_path / "d.json").write_text('[{"t": 1},\n {"t"}]')
    with pytest.raises(json.JSONDecodeError) as e:
        list(json_rows(tmp_path / "d.json"))
    assert e.value.lineno == 2


def test_counts_come_back_from_worker_processes(tmp_path, tiny_tokenizer):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(40):
        (d / f"f{i:02d}.txt").write_text(make_text(30 + i, 2000 + i))
    for name in ("x.txt", "y.txt"):
        (d / name).write_bytes(b"caf\xe9 " * 50 + b"and \xff more")
    (d / "bin.txt").write_bytes(b"\x00\x01" * 10)

    def stats(num_proc: int) -> dict:
        c = prepare_corpus(
            [str(d)], tiny_tokenizer, cfg(tmp_path / str(num_proc), num_proc=num_proc), use_cache=False
        )
        out = c.stats.to_dict()
        del out["seconds"], out["cache_path"]
        return out

    one, two = stats(1), stats(2)  # 43 files: two processes read them
    assert one["problems"]["undecodable"] == 2 and one["examples"]["undecodable"] == [
        str(d / "x.txt"),
        str(d / "y.txt"),
    ]
    assert one["problems"]["binary"] == 1 and one["files_read"] == 43
    assert two == one
