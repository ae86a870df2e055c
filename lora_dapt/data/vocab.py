"""Domain vocabulary: mine frequent domain tokens with a BPE of the tokenizer's own family and add them.

:func:`extend_vocabulary` reads the domain corpus the way :func:`~lora_dapt.data.corpus.prepare_corpus` does
(same cleaning, same seeded split by document, so the corpus's held-out documents are never mined), then:

1. trains a byte-level BPE (``tokenizers``) with the tokenizer's own normalizer and pre-tokenizer on most of
   the training documents (the *mining* documents; a merge needs ``min_frequency`` occurrences there);
2. scores each mined word-initial token that the old vocabulary spells in several pieces on the rest of the
   training documents (the *selection* documents): tokens saved = its count as a whole word x (old pieces
   - 1); the ``n_tokens`` that save the most are kept;
3. adds them to a copy of the tokenizer as single-word added tokens (matched in the raw text before
   pre-tokenization, only where they are a whole word), and measures tokens per character before and after on the held-out
   domain documents and on the built-in general-English sample.

Trade-offs: only whole words after a space (as byte-level BPE spells them, ``' hepatic'``) become tokens:
an added token is matched in the raw text, so a word piece such as ``enal`` or ``' i'`` would also cut
unrelated words (``penalty``, ``infusion``) and cost tokens; single-word matching rules that out, and the
price is that a word at the very start of a text, or glued to punctuation, keeps its old tokens. The saving of each candidate
is estimated alone; the before/after numbers are measured with all of them. Only byte-level BPE tokenizers
(GPT-2, Llama 3, Qwen, SmolLM, Mistral Nemo) are supported: their tokens map to exact UTF-8 text.
"""

from __future__ import annotations

import bisect
import copy
import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .clean import held_out
from .pieces import _encode
from .sources import Source, as_source_list, read_documents

SELECTION_FRACTION = 0.1
"""Share of the training documents that scores the candidates (the rest is mined)."""

MAX_MINING_CHARS = 50_000_000
"""Characters of mining text the BPE trains on at most (the first documents of the mining split)."""


@dataclass
class Candidate:
    """One mined token and what it would save."""

    text: str
    """The token's text (UTF-8), e.g. ``' hepatic'``."""
    old_pieces: int
    """Tokens the old vocabulary spells it with."""
    count: int
    """Occurrences as a whole word in the selection documents."""
    saving: int
    """Tokens it saves there alone, net of what it costs in the longer words it begins (see ``_score``)."""


@dataclass
class VocabExtension:
    """What :func:`extend_vocabulary` found and measured; ``tokenizer`` is the extended copy."""

    tokenizer: Any
    """A copy of the tokenizer with the new tokens added (the input tokenizer is not changed)."""
    new_tokens: list[str]
    """The tokens added, best first."""
    candidates: list[Candidate]
    """Every candidate that saves a token on the selection documents, best first (the kept ones first)."""
    domain_before: float
    """Tokens per character of the held-out domain documents with the old vocabulary."""
    domain_after: float
    general_before: float
    """Tokens per character of the general-English sample with the old vocabulary."""
    general_after: float
    documents: dict[str, int] = field(default_factory=dict)
    """Documents mined, used for selection and held out (``mining``, ``selection``, ``held_out``)."""
    held_out_source: str = "held-out domain documents"
    """What the domain numbers were measured on."""

    def summary(self) -> str:
        """A few lines for a terminal: the tokens and the tokens-per-character change."""

        def row(name: str, before: float, after: float) -> str:
            change = (after / before - 1) * 100 if before else 0.0
            return f"  {name:<16} {before:8.4f} -> {after:8.4f}  ({change:+.1f}%)"

        d = self.documents
        head = ", ".join(repr(t) for t in self.new_tokens[:12]) + (
            " ..." if len(self.new_tokens) > 12 else ""
        )
        return "\n".join(
            [
                f"vocabulary: +{len(self.new_tokens)} tokens ({len(self.candidates)} candidates saved tokens), "
                f"mined from {d.get('mining', 0)} documents, selected on {d.get('selection', 0)}",
                "  tokens per character",
                row(f"domain ({d.get('held_out', 0)} docs)", self.domain_before, self.domain_after),
                row("general", self.general_before, self.general_after),
                f"  new tokens: {head or '(none)'}",
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers (no tokenizer)."""
        return {
            "new_tokens": self.new_tokens,
            "domain_tokens_per_char": [self.domain_before, self.domain_after],
            "general_tokens_per_char": [self.general_before, self.general_after],
            "documents": self.documents,
            "held_out_source": self.held_out_source,
        }


def extend_vocabulary(
    tokenizer: Any,
    corpus_sources: Source | Sequence[Source] | None,
    n_tokens: int = 1000,
    min_frequency: int = 5,
    *,
    config: DataConfig | None = None,
    general: Sequence[str] | None = None,
) -> VocabExtension:
    """Mine up to ``n_tokens`` domain tokens from ``corpus_sources`` and add them to a copy of ``tokenizer``.

    See the module docstring for the method. ``corpus_sources`` takes what ``prepare_corpus`` takes (None:
    ``config.sources``); ``config`` gives the cleaning and the split (the same documents are held out as
    ``prepare_corpus`` holds out with it, so the held-out numbers are honest). ``general``: general texts for
    the tokens-per-character check (default: the built-in sample of ``lora_dapt.evaluate.forgetting``).

    Raises:
        ConfigError: a slow or non-byte-level-BPE tokenizer, or n_tokens / min_frequency < 1.
        DataError: no usable document, or fewer than 2 training documents (nothing to select on).

    Example::

        ext = extend_vocabulary(tokenizer, ["domain/*.txt"], n_tokens=500)
        print(ext.summary())
        corpus = prepare_corpus(["domain/*.txt"], ext.tokenizer, cfg)
    """
    check_byte_level_bpe(tokenizer)
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ConfigError(f"n_tokens = {n_tokens!r}: must be >= 1 (new tokens to add, e.g. 500)")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError(f"min_frequency = {min_frequency!r}: must be >= 1 (e.g. 5)")
    cfg = config or DataConfig()
    mining, selection, held, held_source = _split_texts(corpus_sources, cfg)
    mined = _train_bpe(tokenizer, mining, min_frequency)
    candidates = _score(tokenizer, mined, selection)
    chosen = [c.text for c in candidates[:n_tokens]]

    from tokenizers import AddedToken

    extended = copy.deepcopy(tokenizer)
    extended.add_tokens([AddedToken(t, normalized=False, special=False) for t in chosen])
    if general is None:
        from ..evaluate.forgetting import general_texts

        general = general_texts()
    return VocabExtension(
        tokenizer=extended,
        new_tokens=chosen,
        candidates=candidates,
        domain_before=tokens_per_char(tokenizer, held),
        domain_after=tokens_per_char(extended, held),
        general_before=tokens_per_char(tokenizer, general),
        general_after=tokens_per_char(extended, general),
        documents={"mining": len(mining), "selection": len(selection), "held_out": len(held)},
        held_out_source=held_source,
    )


def tokens_per_char(tokenizer: Any, texts: Sequence[str]) -> float:
    """Tokens (no special tokens) per character of ``texts``; 0.0 for no text."""
    chars = sum(len(t) for t in texts)
    if not chars:
        return 0.0
    return sum(len(ids) for ids in _encode(tokenizer, list(texts))) / chars


def retokenize_blocks(blocks: Any, tokenizer: Any, base_tokenizer: Any) -> Any:
    """Packed blocks of ``tokenizer`` (a run's, new tokens included) as ``base_tokenizer`` (the model's own,
    without them) would have packed the same text: what a model without the new rows can score.

    Each piece (a segment of a block: ``position_ids`` restart at 0) is decoded back to its text, which
    byte-level BPE does exactly, encoded with ``base_tokenizer`` (its BOS / EOS ids kept as they were), and
    the pieces are packed again into blocks of the same length (:func:`~lora_dapt.data.packing._pack_arrays`:
    a piece now longer than a block is cut). ``bytes`` are the pieces' own UTF-8 bytes, so the split's total
    is the same and bits per byte compares the two tokenizations over the same text. A block's padding is
    its last segment: no label, pad ids only.
    """
    import datasets
    import numpy as np

    from .packing import _pack_arrays

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None), 0)
    pieces: list[list[int]] = []
    n_bytes: list[int] = []
    for row in blocks:
        ids, pos, labels = row["input_ids"], row["position_ids"], row["labels"]
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(ids)]
        for s, e in zip(starts, starts[1:], strict=False):
            if e == len(ids) and all(x == -100 for x in labels[s:e]) and all(x == pad_id for x in ids[s:e]):
                continue  # the block's padding
            head = ids[s : s + 1] if bos is not None and ids[s] == bos else []
            tail = ids[e - 1 : e] if eos is not None and ids[e - 1] == eos and e - s > len(head) else []
            body = ids[s + len(head) : e - len(tail)]
            text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(head + base_tokenizer(text, add_special_tokens=False)["input_ids"] + tail)
            n_bytes.append(len(text.encode("utf-8")))
    seq_len = len(blocks[0]["input_ids"]) if len(blocks) else 1
    packed = _pack_arrays(pieces, seq_len, pad_id, byte_counts=n_bytes)
    assert packed.n_bytes is not None
    return datasets.Dataset.from_dict(
        {
            "input_ids": packed.ids.tolist(),
            "position_ids": packed.positions.tolist(),
            "labels": packed.labels.tolist(),
            "bytes": np.asarray(packed.n_bytes).tolist(),
        }
    )


def check_byte_level_bpe(tokenizer: Any) -> dict[str, Any]:
    """The backend JSON of a fast byte-level BPE tokenizer; ConfigError naming what the tokenizer is else."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"extending the vocabulary needs a fast tokenizer; {type(tokenizer).__name__} is a Python one. Load "
            "the model's tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = (spec.get("model") or {}).get("type")
    pre = json.dumps(spec.get("pre_tokenizer"))
    if kind != "BPE" or '"ByteLevel"' not in pre:
        raise ConfigError(
            f"extending the vocabulary supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM); this "
            f"one is a {kind} model with pre-tokenizer {pre[:120]}. Set adapter.new_tokens to 0"
        )
    return spec


# ---------------------------------------------------------------------------------------------------------------


def _split_texts(
    sources: Source | Sequence[Source] | None, cfg: DataConfig
) -> tuple[list[str], list[str], list[str], str]:
    """(mining, selection, held-out texts, what the held-out texts are): the split of ``prepare_corpus``,
    its training documents cut once more by document into mining and selection."""
    from .corpus import _clean_and_split
    from .stats import CorpusStats

    src = as_source_list(sources) if sources is not None else list(cfg.sources)
    if not src:
        raise DataError("no sources to mine a vocabulary from: pass files, globs or datasets (data.sources)")
    ev_src = list(cfg.eval_sources)
    with tempfile.TemporaryDirectory(prefix="lora_dapt_vocab_") as tmp:
        work = Path(tmp)
        docs = read_documents(src, cfg, work, "domain")
        ev_docs = read_documents(ev_src, cfg, work, "eval") if ev_src else None
        train, ev = _clean_and_split(docs, ev_docs, cfg, CorpusStats(seq_len=cfg.seq_len))
        train_texts = list(train["text"]) if len(train) else []
        held = list(ev["text"]) if len(ev) else []
    if len(train_texts) < 2:
        raise DataError(
            f"extending the vocabulary needs at least 2 training documents (one to mine, one to choose on); "
            f"the sources give {len(train_texts)}. Add documents or set adapter.new_tokens to 0"
        )
    picked = held_out(len(train_texts), SELECTION_FRACTION, cfg.seed + 2)
    mining = [t for i, t in enumerate(train_texts) if i not in picked]
    selection = [t for i, t in enumerate(train_texts) if i in picked]
    source = "held-out domain documents"
    if not held:  # no eval split (eval_fraction 0): report on the selection documents, and say so
        held, source = selection, "selection documents (no held-out split: data.eval_fraction is 0)"
    return mining, selection, held, source


def _train_bpe(tokenizer: Any, texts: list[str], min_frequency: int) -> Any:
    """A BPE of the tokenizer's family (its normalizer and pre-tokenizer) trained on ``texts`` (up to
    MAX_MINING_CHARS characters), as large as the tokenizer's own vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = tokenizer.backend_tokenizer
    mined = Tokenizer(models.BPE(unk_token=None))
    mined.normalizer = backend.normalizer
    mined.pre_tokenizer = backend.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=backend.get_vocab_size(with_added_tokens=False),
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    kept, n = [], 0
    for t in texts:
        if n >= MAX_MINING_CHARS:
            break
        kept.append(t)
        n += len(t)
    mined.train_from_iterator(kept, trainer=trainer)
    return mined


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's table, inverted)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _score(tokenizer: Any, mined: Any, selection: list[str]) -> list[Candidate]:
    """The mined word-initial tokens the old vocabulary splits, with their net saving on ``selection``
    (best first; ties by text); those that save nothing are left out.

    An added token ``' i'`` is matched at the start of every word it begins (``' infusion'`` becomes
    ``' i' + 'nfusion'``), so the saving is: whole-word occurrences x (old pieces - 1), minus, for every
    longer word it begins, the tokens that word gains (1 + old pieces of the rest - old pieces of the word).
    Each candidate is scored alone (a longer chosen token wins where both match).
    """
    decoder = _byte_decoder()

    def text_of(token: str) -> str | None:
        try:
            return bytes(decoder[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):  # part of a multi-byte character: not a text of its own
            return None

    words: Counter[str] = Counter()  # byte-level pre-tokens, as the BPE sees them
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    for t in selection:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    wlist = sorted(words)
    wtext = {w: text_of(w) for w in wlist}
    cands: dict[str, str] = {}
    for token in mined.get_vocab():
        text = text_of(token)
        if text is not None and len(text) >= 2 and text[0] == " " and text[1:] and not text[1:].isspace():
            cands[token] = text
    # which words each candidate begins, and what is left of them
    begins: dict[str, list[tuple[str, str]]] = {}
    for token in cands:
        k = bisect.bisect_left(wlist, token)
        hits = []
        while k < len(wlist) and wlist[k].startswith(token):
            w = wlist[k]
            rest = w[len(token) :]
            if w != token and wtext[w] is not None and text_of(rest) is not None:
                hits.append((w, rest))
            k += 1
        if token in words:  # a whole word of the selection (a mere prefix only costs)
            begins[token] = hits
    need = {cands[t] for t in begins} | {wtext[w] for hits in begins.values() for w, _ in hits}
    need |= {text_of(r) for hits in begins.values() for _, r in hits}
    order = sorted(x for x in need if x)
    n_old = dict(zip(order, (len(ids) for ids in _encode(tokenizer, order)), strict=True))
    out = []
    for token, hits in begins.items():
        pieces = n_old[cands[token]]
        if pieces < 2:
            continue
        gain = words.get(token, 0) * (pieces - 1)
        loss = sum(words[w] * (1 + n_old[text_of(r)] - n_old[wtext[w]]) for w, r in hits)
        if gain - loss > 0:
            out.append(Candidate(cands[token], pieces, words.get(token, 0), gain - loss))
    out.sort(key=lambda c: (-c.saving, c.text))
    return out
