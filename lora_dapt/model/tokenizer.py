"""The base model's tokenizer, with a pad token that keeps EOS learnable.

Kept apart from :mod:`~lora_dapt.model.load` so that the GGUF import (:mod:`~lora_dapt.model.gguf`), which
saves the GGUF's tokenizer beside its dequantized weights, and the model loader share one tokenizer loader.
Both names are importable from :mod:`lora_dapt.model.load` as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""Files of which at least one is in every directory a tokenizer was saved to."""

TOKENIZER_LOOKED_FOR = (*TOKENIZER_FILES, "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
"""Every file a tokenizer can be loaded from (fast, sentencepiece, BPE vocab/merges, WordPiece)."""


PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|finetune_right_pad|>")
"""Dedicated padding tokens a vocabulary may already have, in order of preference."""


def has_tokenizer_files(directory: str | Path) -> bool:
    """True when ``directory`` holds a saved tokenizer (an adapter directory training wrote, a model)."""
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def fix_tokenizer(tokenizer: Any) -> str:
    """Give the tokenizer a pad token without making EOS unlearnable; returns where the pad token came from.

    Preference: an existing pad token ('tokenizer'); else a dedicated special token the vocabulary already
    has (:data:`PAD_CANDIDATES`: its text; the unk token: 'unk') so that pad != eos; else eos itself ('eos').
    Using eos as pad is safe here because lora_dapt builds labels from positions, never by masking every
    pad-token id (the bug that stops models from learning to end, trl #1623).
    :func:`~lora_dapt.model.load.load_base_model` records the answer in ``ModelSource.pad_token``.
    """
    if tokenizer.pad_token_id is not None:
        return "tokenizer"
    vocab = tokenizer.get_vocab()
    for cand in PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != tokenizer.eos_token_id:
            tokenizer.pad_token = cand
            return cand
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return "unk"
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            "the tokenizer has neither a pad, unk nor eos token; add one, e.g. "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings"
        )
    tokenizer.pad_token = tokenizer.eos_token
    return "eos"


def load_tokenizer(
    name_or_path: str | Path, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The tokenizer of a model directory, GGUF file or hub id, with a pad token (:func:`fix_tokenizer`)."""
    tok = load_raw_tokenizer(name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    fix_tokenizer(tok)
    return tok


def load_raw_tokenizer(
    name_or_path: str | Path, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The tokenizer as saved, without :func:`fix_tokenizer` (for callers that record where the pad token
    comes from); a tokenizer that cannot be read is a :class:`ModelLoadError` naming the path."""
    from transformers import AutoTokenizer

    local = Path(name_or_path)
    if not gguf_file and local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_LOOKED_FOR):
        raise ModelLoadError(
            f"{local} has no tokenizer files (looked for {', '.join(TOKENIZER_LOOKED_FOR)}): copy the "
            "tokenizer of the model into it (tokenizer.save_pretrained(...)), or point at a directory that has one"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {name_or_path!s}: {e}") from None
