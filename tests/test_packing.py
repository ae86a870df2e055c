"""lora_dapt.packing: every token in exactly one block, segments that transformers will keep apart."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import find_packed_sequence_indices

from lora_dapt.data import packing
from lora_dapt.data.packing import IGNORE_INDEX, pack_documents, plan_blocks, segment_ids


def test_docstring_examples_hold():
    result = doctest.testmod(packing)
    assert result.attempted >= 4 and result.failed == 0


def test_worked_example():
    blocks = pack_documents([[5, 6, 7], [1, 2, 3, 4, 5], [8]], seq_len=4, pad_id=9)
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 5], [8, 9, 9, 9]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 0, 1, 2]]
    assert [b["labels"] for b in blocks] == [[-100, 2, 3, 4], [-100, 6, 7, -100], [-100] * 4]


def _check_blocks(lengths: list[int], seq_len: int) -> None:
    # token values are unique (document, offset) codes, so we can tell where each one came from
    docs = [[1000 * d + t + 1 for t in range(n)] for d, n in enumerate(lengths)]
    pad = -7
    blocks = pack_documents(docs, seq_len, pad)
    plan = plan_blocks(lengths, seq_len)
    assert len(blocks) == len(plan)
    seen: list[int] = []
    for b, pieces in zip(blocks, plan, strict=True):
        ids, pos, lab = b["input_ids"], b["position_ids"], b["labels"]
        assert len(ids) == len(pos) == len(lab) == seq_len
        used = sum(e - s for _, s, e in pieces)
        n_pad = seq_len - used
        assert ids[used:] == [pad] * n_pad and lab[used:] == [IGNORE_INDEX] * n_pad
        seg = segment_ids(pos)
        # each piece is one segment; padding (if any) is one more segment
        assert seg[-1] + 1 == len(pieces) + (1 if n_pad else 0)
        t = 0
        for d, s, e in pieces:
            assert ids[t : t + e - s] == docs[d][s:e]
            assert pos[t : t + e - s] == list(range(e - s))
            assert lab[t] == IGNORE_INDEX and lab[t + 1 : t + e - s] == docs[d][s + 1 : e]
            assert len(set(seg[t : t + e - s])) == 1
            t += e - s
        if n_pad:
            assert set(seg[used:]) == {seg[-1]} and (used == 0 or seg[used - 1] != seg[used])
        seen += [x for x in ids if x != pad]
    # every token exactly once, nothing invented
    assert sorted(seen) == sorted(x for doc in docs for x in doc)
    # best fit: at most one block is half empty or worse (otherwise its pieces would have fit elsewhere)
    fills = [sum(e - s for _, s, e in p) for p in plan]
    assert sum(f <= seq_len / 2 for f in fills) <= 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=25), st.integers(1, 17))
def test_every_token_in_exactly_one_block(lengths, seq_len):
    _check_blocks(lengths, seq_len)


def test_long_document_is_cut_not_truncated():
    blocks = pack_documents([list(range(1, 24))], seq_len=5, pad_id=0)
    flat = [x for b in blocks for x in b["input_ids"] if x]
    assert sorted(flat) == list(range(1, 24))
    assert len(blocks) == 5  # 23 tokens: 4 full pieces + 3 tokens + 2 pads


def test_caller_labels_are_kept_except_at_piece_starts():
    docs = [[10, 11, 12, 13], [20, 21, 22]]
    labels = [[-100, -100, 12, 13], [20, 21, 22]]
    blocks = pack_documents(docs, seq_len=8, pad_id=0, label_lists=labels)
    assert len(blocks) == 1
    assert blocks[0]["labels"] == [-100, -100, 12, 13, -100, 21, 22, -100]
    with pytest.raises(ValueError, match="labels"):
        pack_documents(docs, 8, 0, label_lists=[[1], [2, 3, 4]])


def test_eos_keeps_its_label_when_pad_is_eos():
    eos = 1
    blocks = pack_documents([[0, 5, 6, eos], [0, 7, eos]], seq_len=10, pad_id=eos)
    lab, ids = blocks[0]["labels"], blocks[0]["input_ids"]
    eos_positions = [t for t, (i, la) in enumerate(zip(ids[:7], lab[:7], strict=True)) if i == eos]
    assert eos_positions == [3, 6] and all(lab[t] == eos for t in eos_positions)
    assert lab[7:] == [IGNORE_INDEX] * 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.integers(2, 16))
def test_segments_match_transformers_packed_sequence_detection(lengths, seq_len):
    docs = [[d + 2] * n for d, n in enumerate(lengths)]
    for b in pack_documents(docs, seq_len, pad_id=0):
        pos = torch.tensor([b["position_ids"]])
        hf = find_packed_sequence_indices(pos)
        ours = segment_ids(b["position_ids"])
        if hf is None:  # transformers says: a single sequence
            assert set(ours) == {0}
        else:
            assert hf[0].tolist() == ours


def test_deterministic_and_rejects_bad_seq_len():
    lengths = [5, 3, 9, 1, 4, 4, 2]
    # worked by hand: the full piece of doc 2 alone, then longest first into the tightest block that fits
    expected = [
        [(2, 0, 6)],
        [(0, 0, 5), (3, 0, 1)],
        [(4, 0, 4), (6, 0, 2)],
        [(5, 0, 4)],
        [(1, 0, 3), (2, 6, 9)],
    ]
    assert plan_blocks(lengths, 6) == expected
    assert plan_blocks(list(lengths), 6) == expected  # ties broken by document order, not by chance
    with pytest.raises(ValueError, match="seq_len"):
        plan_blocks([3], 0)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(8, 64),
    st.lists(st.tuples(st.integers(1, 300), st.booleans()), min_size=1, max_size=40),
)
def test_gap_filling_keeps_every_token_and_whole_short_documents(seq_len, docs):
    # pieces as prepare_corpus hands them over: a long document's pieces are splittable, short ones not
    lengths, flags = [], []
    for n, long_doc in docs:
        n = max(n, seq_len + 1) if long_doc else min(n, seq_len)
        for s in range(0, n, seq_len):
            lengths.append(min(seq_len, n - s))
            flags.append(long_doc)
    plain = plan_blocks(lengths, seq_len)
    filled = plan_blocks(lengths, seq_len, splittable=flags)
    covered = sorted((d, t) for b in filled for d, s, e in b for t in range(s, e))
    assert covered == [(d, t) for d, n in enumerate(lengths) for t in range(n)]  # every token exactly once
    assert all(sum(e - s for _, s, e in b) <= seq_len for b in filled)
    for d, n in enumerate(lengths):
        parts = [(s, e) for b in filled for dd, s, e in b if dd == d]
        if not flags[d]:
            assert parts == [(0, n)]  # a short document is never cut
    assert len(filled) <= len(plain)  # never more padding
    cuts = sum(len(b) for b in filled) - len(lengths)
    assert cuts >= 0 and (cuts == 0) == (len(filled) == len(plain) and filled == plain)


def test_gap_filling_removes_padding_of_long_document_tails():
    seq_len = 100
    # ten long documents whose last pieces (60..69 tokens) cannot share a block: plain BFD pads each
    lengths, flags = [], []
    for k in range(10):
        lengths += [100, 60 + k]
        flags += [True, True]
    plain = plan_blocks(lengths, seq_len)
    filled = plan_blocks(lengths, seq_len, splittable=flags)
    total = sum(lengths)
    assert len(plain) == 20  # 10 full + 10 tails alone
    assert len(filled) == -(-total // seq_len) == 17  # the fewest blocks these tokens can take
    ids, pos, lab, n_pad, cuts, _ = packing._pack_arrays(
        [list(range(1, n + 1)) for n in lengths], seq_len, 0, splittable=flags
    )
    assert ids.shape == (17, seq_len) and int(n_pad.sum()) == 17 * seq_len - total
    assert cuts == sum(len(b) for b in filled) - len(lengths) > 0
    # every fragment starts a segment whose first token is not a target
    assert int((pos == 0).sum()) == sum(len(b) for b in filled) + int((n_pad > 0).sum())
    assert int((lab != IGNORE_INDEX).sum()) == total - sum(len(b) for b in filled)


def test_splittable_flags_must_match_the_documents():
    with pytest.raises(ValueError, match="got 1 splittable flags for 2 documents"):
        plan_blocks([5, 9], 4, splittable=[True])


def test_block_bytes_add_up_to_the_documents_bytes_when_gap_filling_cuts_them():
    seq_len = 100
    lengths, flags = [], []
    for k in range(10):
        lengths += [100, 60 + k]
        flags += [True, True]
    n_bytes = [3 * n + k for k, n in enumerate(lengths)]  # any byte counts
    packed = packing._pack_arrays(
        [list(range(1, n + 1)) for n in lengths], seq_len, 0, splittable=flags, byte_counts=n_bytes
    )
    assert packed.n_cuts > 0 and packed.n_bytes.shape == (17,)
    assert int(packed.n_bytes.sum()) == sum(n_bytes)
    # a piece cut in two shares its bytes by tokens, rounded at the cut: 10 bytes over 3 tokens -> 3 + 7
    assert packing.share_bytes([10, 10], [3, 3], [0, 1], [1, 3]).tolist() == [3, 7]


def test_pieces_of_a_long_document_share_its_bytes():
    from lora_dapt.data.pieces import _pieces_table

    table = _pieces_table([list(range(25)), [7, 8]], [0, 0], [True, True], [0, 1], 10, 0, 1, [1000, 9])
    assert table.column("length").to_pylist() == [10, 10, 7, 4]  # 25 tokens + BOS + EOS = 27
    got = table.column("bytes").to_pylist()
    assert got == [370, 371, 259, 9] and sum(got[:3]) == 1000
