"""The tokenizer of a GGUF file: vocabulary, token types, merges, special tokens and chat template.

llama.cpp does not run a ``tokenizer.json``; it rebuilds the tokenizer from metadata under its own key names
(``tokenizer.ggml.*``). Two kinds are written here, read from the fast tokenizer in memory:

- byte-level BPE (``tokenizer.ggml.model = "gpt2"``: SmolLM2, Llama 3, Qwen2): tokens spelled in the GPT-2
  byte alphabet, their types and the merges, plus the pre-tokenizer's name (``tokenizer.ggml.pre``), which
  tells llama.cpp how to split text before the merges. The name is recognised from the pre-tokenizer's
  structure (:data:`PRE_TOKENIZERS`), never guessed: an unknown one is refused, as a file that splits text
  differently from training would quietly lose quality.
- SentencePiece-style BPE with byte fallback (``"llama"``: Llama 2, Mistral): tokens with ``▁``, scores
  (``-id``: sentencepiece orders its BPE pieces by score, so the id order is the merge priority) and types
  (``<0xNN>`` pieces are BYTE), plus the merges for readers that use them.

The vocabulary is as long as the embedding matrix: an extended vocabulary (``tokenizer.add_tokens`` + a
resize) keeps its added tokens, and rows beyond the tokenizer (a vocabulary padded to a multiple of 64)
become ``[PAD<id>]`` tokens of type UNUSED, as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExportError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
"""llama.cpp's token types (``gguf.TokenType``), spelled here so this module needs no ``gguf`` import."""

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PRE_TOKENIZERS: dict[str, str] = {
    "ByteLevel(regex)": "gpt-2",
    "Digits(individual)+ByteLevel(regex)": "smollm",
    f"Split({_LLAMA3_SPLIT})+ByteLevel": "llama-bpe",
    f"Split({_QWEN2_SPLIT})+ByteLevel": "qwen2",
}
"""A byte-level pre-tokenizer's structure (:func:`pre_tokenizer_signature`) -> llama.cpp's name for it."""


@dataclass
class GGUFVocab:
    """Everything the writer puts under ``tokenizer.ggml.*`` (and ``tokenizer.chat_template``)."""

    model: str
    """``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece-style BPE)."""
    pre: str | None
    """llama.cpp's pre-tokenizer name (byte-level only)."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    """``bos``/``eos``/``unk``/``pad`` -> id, for those the tokenizer has."""
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    padded_rows: int = 0
    """Embedding rows beyond the tokenizer, written as ``[PAD<id>]`` tokens."""

    def add_to(self, writer: Any) -> None:
        """Write this vocabulary into ``writer`` (a ``gguf.GGUFWriter``)."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def pre_tokenizer_signature(pre: dict[str, Any] | None) -> str:
    """A short structural description of a ``tokenizer.json`` pre-tokenizer, the key of
    :data:`PRE_TOKENIZERS`. Example: ``{"type": "ByteLevel", "use_regex": True}`` -> ``"ByteLevel(regex)"``."""
    if pre is None:
        return "none"
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    out = []
    for p in parts or []:
        kind = p.get("type")
        if kind == "ByteLevel":
            out.append("ByteLevel(regex)" if p.get("use_regex", True) else "ByteLevel")
        elif kind == "Digits":
            out.append("Digits(individual)" if p.get("individual_digits") else "Digits")
        elif kind == "Split":
            pattern = p.get("pattern", {})
            out.append(f"Split({pattern.get('Regex', pattern.get('String'))})")
        else:
            out.append(str(kind))
    return "+".join(out)


def _merges(model: dict[str, Any]) -> list[str]:
    """``"a b"`` merge strings; a space inside a part (possible since tokenizers 0.20's pair format) is
    spelled as U+0120 + 256, the escape llama.cpp's reader expects."""
    out = []
    for m in model.get("merges") or []:
        pair = m.split(" ", 1) if isinstance(m, str) else m
        out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair))
    return out


def _kind(backend: dict[str, Any]) -> str:
    model = backend.get("model", {})
    pre, dec = json.dumps(backend.get("pre_tokenizer")), json.dumps(backend.get("decoder"))
    if model.get("type") == "BPE" and ('"ByteLevel"' in pre or '"ByteLevel"' in dec):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ExportError(
        f"the tokenizer is a {model.get('type')} model ({'with' if model.get('byte_fallback') else 'without'} "
        "byte fallback), which the GGUF export does not write; supported: byte-level BPE (GPT-2 style: "
        "SmolLM2, Llama 3, Qwen2) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral)"
    )


def read_vocab(tokenizer: Any, n_rows: int) -> GGUFVocab:
    """The GGUF vocabulary of a fast ``tokenizer`` for an embedding matrix of ``n_rows`` rows.

    ExportError when the tokenizer is not a fast one, is of a kind llama.cpp cannot rebuild, has an
    unknown pre-tokenizer, or has more tokens than the model has embedding rows.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            "the GGUF export needs a fast tokenizer (tokenizer.json); this one is a slow tokenizer"
        )
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = _kind(backend)
    n_tok = len(tokenizer)
    if n_tok > n_rows:
        raise ExportError(
            f"the tokenizer has {n_tok} tokens but the model only {n_rows} embedding rows: resize the "
            "embeddings (model.resize_token_embeddings(len(tokenizer))) before merging"
        )
    pre = None
    if kind == "gpt2":
        signature = pre_tokenizer_signature(backend.get("pre_tokenizer"))
        pre = PRE_TOKENIZERS.get(signature)
        if pre is None:
            raise ExportError(
                f"unknown byte-level pre-tokenizer {signature[:300]!r}: llama.cpp would split text differently "
                f"from training; supported: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
            )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a for a in backend.get("added_tokens", [])}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_rows):
        if i >= n_tok or i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = by_id[i]
        if i in added:
            text = added[i]["content"]
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        tokens.append(text)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < n_rows and kind == "llama":
        types[tokenizer.unk_token_id] = UNKNOWN
    special = {
        k: v
        for k, v in (
            ("bos", tokenizer.bos_token_id),
            ("eos", tokenizer.eos_token_id),
            ("unk", tokenizer.unk_token_id),
            ("pad", tokenizer.pad_token_id),
        )
        if isinstance(v, int) and 0 <= v < n_rows
    }
    # what the tokenizer really does, not what a flag says: encode a probe text
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    scores = None
    if kind == "llama":
        scores = [0.0 if t in (CONTROL, BYTE, UNUSED, UNKNOWN) else -float(i) for i, t in enumerate(types)]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return GGUFVocab(
        model=kind,
        pre=pre,
        tokens=tokens,
        types=types,
        merges=_merges(backend.get("model", {})),
        scores=scores,
        special_ids=special,
        add_bos="bos" in special and bool(probe) and probe[0] == special["bos"],
        add_eos="eos" in special and bool(probe) and probe[-1] == special["eos"],
        chat_template=template,
        padded_rows=max(0, n_rows - n_tok),
    )


def gguf_tokens(path: str | Path) -> tuple[list[str], list[int]]:
    """(tokens, token types) of a GGUF file's vocabulary, read from its metadata (``tokenizer.ggml.*``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tokens, types = reader.fields.get("tokenizer.ggml.tokens"), reader.fields.get("tokenizer.ggml.token_type")
    if tokens is None:
        raise ExportError(f"{path} holds no tokenizer.ggml.tokens: not a GGUF file with a vocabulary")
    text = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    kinds = [int(types.parts[i][0]) for i in types.data] if types is not None else [NORMAL] * len(text)
    return text, kinds


def with_user_defined(tokenizer: Any, path: str | Path) -> Any:
    """``tokenizer`` (transformers' reload of the GGUF file ``path``) with the file's USER_DEFINED tokens
    matched whole at their ids, as llama.cpp matches them.

    Why: a byte-level file stores an added token as its raw text (``' plaintiff'``, as llama.cpp's converter
    does), and transformers' reader respells every token into the byte alphabet (``'Ġplaintiff'``), then adds
    back only the USER_DEFINED tokens it finds under their raw text: none with a space or a non-ASCII
    character, so those are cut into pieces and the ids differ from training's. Here each missing one becomes
    an added token at its id (its raw text is entered in the BPE vocabulary at that id, where no merge can
    produce it, so the added-token table keeps the id). Returns ``tokenizer`` itself when none is missing.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokens, kinds = gguf_tokens(path)
    vocab = tokenizer.get_vocab()
    missing = {i: t for i, (t, k) in enumerate(zip(tokens, kinds, strict=True)) if k == USER_DEFINED}
    missing = {i: t for i, t in missing.items() if vocab.get(t) != i}
    if not missing:
        return tokenizer
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model_vocab = backend["model"]["vocab"]
    merged = {
        "".join(m.split(" ", 1) if isinstance(m, str) else m) for m in backend["model"].get("merges") or []
    }
    for i, (t, k) in enumerate(zip(tokens, kinds, strict=True)):
        if k == NORMAL and t in model_vocab:
            model_vocab[t] = i  # an added token respelled like a normal one took its id in the reader
    by_id = {i: t for t, i in model_vocab.items()}
    for i, t in missing.items():
        if by_id.get(i) is not None and by_id[i] not in merged:
            del model_vocab[by_id[i]]  # the respelled copy: two spellings of one id make the id ambiguous
        model_vocab[t] = i
        added = {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False}
        backend["added_tokens"].append({**added, "normalized": False, "special": False})
    specials = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(backend)),
        **{k: v for k, v in specials.items() if v is not None},
    )
