"""``lora-dapt vocab CONFIG``: preview the domain tokens ``adapter.new_tokens`` would add; writes nothing."""

from __future__ import annotations

from typing import Any

DEFAULT_PREVIEW_TOKENS = 500
"""Tokens previewed when the config asks for none (adapter.new_tokens: 0)."""


def vocab_preview(config: Any, n_tokens: int | None = None, show: int = 40) -> str:
    """The preview text for a :class:`~lora_dapt.config.RunConfig`: the chosen tokens with what each saves, and
    tokens per character before and after on held-out domain and general text. Nothing is written (the
    corpus cache included)."""
    from ..data.vocab import extend_vocabulary
    from ..evaluate.forgetting import general_texts
    from ..model.load import tokenizer_before_load

    a = config.adapter
    n = n_tokens or a.new_tokens or DEFAULT_PREVIEW_TOKENS
    tokenizer = tokenizer_before_load(config.model, config.data.seq_len)
    ev = config.eval
    general = general_texts(ev.general_sources or None)
    ext = extend_vocabulary(
        tokenizer, config.data.sources, n, a.new_tokens_min_frequency, config=config.data, general=general
    )
    lines = [ext.summary(), "", f"  {'token':<28} {'old pieces':>10} {'as a word':>10} {'saves':>8}"]
    for c in ext.candidates[: min(show, len(ext.new_tokens))]:
        lines.append(f"  {c.text!r:<28} {c.old_pieces:>10} {c.count:>10} {c.saving:>8}")
    if len(ext.new_tokens) > show:
        lines.append(f"  ... and {len(ext.new_tokens) - show} more")
    if not a.new_tokens:
        lines.append(
            f"\n(adapter.new_tokens is 0: previewed {n}; set adapter.new_tokens: {n} to train with them)"
        )
    return "\n".join(lines)
