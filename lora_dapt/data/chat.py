"""Chat templates, assistant-only labels, and SFT data: validated conversations -> packed blocks.

:func:`prepare_sft_data` reads and validates the rows (:mod:`.conversations`), renders each conversation
with the tokenizer's chat template (or :data:`DEFAULT_CHAT_TEMPLATE`), labels only the assistant tokens
(and the end-of-turn token that closes them), holds out whole conversations for evaluation and packs them
with :func:`lora_dapt.data.packing.pack_documents`. A conversation longer than ``seq_len`` is dropped (counted,
with examples), not cut.

Every format becomes a list of chat messages and is rendered with the tokenizer's chat template, so training
and inference see the same format. A tokenizer without a template (a base model) gets
:data:`DEFAULT_CHAT_TEMPLATE`, which is saved with the tokenizer in the run's ``adapter/`` (and so in the
merged model). It uses plain-text role headers, no new tokens, so the embeddings need not grow::

    <s>### System:\\nBe brief.\\n\\n### User:\\nWhat is a dose?\\n\\n### Assistant:\\nAn amount.</s>\\n\\n

Labels. Masking is by position, never by token id (pad may equal eos, trl #1623): assistant content and
the end-of-turn token after it are trained, every other token (BOS, system, user, role headers) is -100.
Templates with ``{% generation %}`` blocks (the default one) give the assistant positions directly
(``return_assistant_tokens_mask``). For other templates the conversation is rendered prefix by prefix: the
assistant turn ``i`` spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i+1])``; the whole conversation is tokenized once and a token is trained when its
characters overlap a span, so the labelled tokens are exactly the trained ones. A template that renders
earlier turns differently once later turns are added is reported, not guessed around. When the last
assistant turn does not end with EOS or another special token, EOS is appended and trained.

Packing. Conversations are packed with :func:`~lora_dapt.data.packing.pack_documents`: ``position_ids`` restart at
every conversation and the model runs without an attention mask, so packed conversations never attend to
each other. Trade-off: conversations longer than ``seq_len`` are dropped (counted and reported with their
line numbers), never cut, because a cut conversation would train answers without their questions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import SFTConfig
from ..errors import DataError, ModelLoadError
from .clean import held_out
from .conversations import (
    FORMATS,
    MAX_REPORTED,
    ROLES,
    SHAREGPT_ROLES,
    Conversation,
    detect_format,
    load_conversations,
    raise_row_problems,
    row_to_messages,
)
from .packing import IGNORE_INDEX, pack_documents

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "FORMATS",
    "MAX_REPORTED",
    "ROLES",
    "SHAREGPT_ROLES",
    "Conversation",
    "SFTData",
    "SFTDataStats",
    "chat_prompt",
    "detect_format",
    "ensure_chat_template",
    "load_conversations",
    "prepare_sft_data",
    "row_to_messages",
    "tokenize_conversation",
]

log = logging.getLogger("lora_dapt")


DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
"""Chat template given to tokenizers without one: plain-text role headers (no new tokens), EOS closing every
assistant turn, ``{% generation %}`` around what is trained. Saved with the tokenizer."""


def ensure_chat_template(tokenizer: Any) -> str:
    """Give ``tokenizer`` :data:`DEFAULT_CHAT_TEMPLATE` when it has no chat template of its own.

    Returns 'tokenizer' (it had one) or 'default' (it got ours; ``save_pretrained`` saves it with it).

    Example::

        ensure_chat_template(tok)   # 'default' for a base model's tokenizer
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    """
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            "the tokenizer has no chat template and no EOS token, so the model could not learn where an "
            "answer ends; give it an eos_token (tokenizer.eos_token = '...') or a chat template"
        )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _has_generation_blocks(template: str) -> bool:
    return "generation %}" in template and "endgeneration" in template


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``full``, by rendering the conversation prefix by prefix."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"the chat template renders turn {i + 1} differently once later turns follow (it rewrites "
                "earlier turns), so the assistant tokens cannot be found by prefix. Use single-turn rows, or a "
                "template with {% generation %} blocks around assistant content"
            )
        end = len(through.rstrip())  # whitespace after the end-of-turn token is not part of the answer
        if end <= len(before):
            raise DataError(f"turn {i + 1}: the chat template renders this assistant turn as nothing")
        spans.append((len(before), end))
    return spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], *, train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Tokenize a conversation with the tokenizer's chat template: ``(input_ids, labels)``.

    ``labels`` equal ``input_ids`` on assistant content and the end-of-turn token that closes it, and -100
    everywhere else (BOS, system, user, role headers); with ``train_on_prompt`` every token is trained. The
    whole conversation is tokenized once, so the labelled tokens are exactly the trained ones. If the last
    trained token is not EOS or another special token, EOS is appended and trained.

    >>> # with DEFAULT_CHAT_TEMPLATE: '<s>### User:\\nHi\\n\\n### Assistant:\\nHello</s>\\n\\n'
    >>> # labels are -100 up to 'Assistant:\\n', then the tokens of 'Hello</s>', then -100 for '\\n\\n'
    """
    template = tokenizer.chat_template or ""
    if _has_generation_blocks(template):
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(enc["input_ids"])
        mask = [bool(x) for x in enc["assistant_masks"]]
        if len(mask) != len(ids):
            raise DataError(f"assistant mask has {len(mask)} entries for {len(ids)} tokens")
    else:
        full = _render(tokenizer, messages)
        spans = _assistant_spans(tokenizer, messages, full)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # a token is trained when its characters overlap a span (zero-width tokens: when they sit inside one)
        mask = [any(s < hi and max(e, s + 1) > lo for lo, hi in spans) for s, e in enc["offset_mapping"]]
    if not any(mask):
        raise DataError(
            "no assistant tokens after applying the chat template (does it render assistant turns?)"
        )
    last = max(i for i, m in enumerate(mask) if m)
    special = set(tokenizer.all_special_ids) - {tokenizer.bos_token_id}
    if ids[last] not in special and tokenizer.eos_token_id is not None:
        # the template closes answers with no special token: the model would never learn to stop
        ids = ids[: last + 1] + [tokenizer.eos_token_id] + ids[last + 1 :]
        mask = mask[: last + 1] + [True] + mask[last + 1 :]
    labels = (
        list(ids) if train_on_prompt else [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    )
    return ids, labels


def chat_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """A user prompt (or messages) rendered with the chat template up to the assistant's answer, as text that
    ``tokenizer(text)`` (with its special tokens) turns into the ids training saw.

    >>> # chat_prompt(tok, "What is a dose?") -> '### User:\\nWhat is a dose?\\n\\n### Assistant:\\n'
    >>> # (the template's leading '<s>' is left to the tokenizer, which adds BOS itself)
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = _render(tokenizer, messages, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]  # the tokenizer adds BOS itself: avoid a double BOS
    return text


@dataclass
class SFTDataStats:
    """What :func:`prepare_sft_data` did with the rows (written to summary.json as ``data_stats``)."""

    formats: dict[str, str] = field(default_factory=dict)
    """Source -> detected format."""
    rows: int = 0
    conversations_train: int = 0
    conversations_eval: int = 0
    dropped_too_long: int = 0
    dropped_examples: list[str] = field(default_factory=list)
    """Where the first few dropped conversations are (file and line)."""
    trailing_turns_dropped: int = 0
    chat_template: str = ""
    """'tokenizer' (its own) or 'default' (DEFAULT_CHAT_TEMPLATE)."""
    train_tokens: int = 0
    trained_tokens: int = 0
    """Tokens with a loss (assistant tokens and their EOS, unless train_on_prompt)."""
    train_blocks: int = 0
    eval_blocks: int = 0
    padding_fraction: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)
    """What was tuned: model_or_run, kind ('run' | 'model'), stack, base loaded."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.rows} rows ({', '.join(sorted(set(self.formats.values())))}), "
            f"{self.conversations_train} train / {self.conversations_eval} eval conversations, "
            f"{self.dropped_too_long} dropped as too long, chat template: {self.chat_template}; "
            f"{self.train_blocks} train blocks, {self.trained_tokens}/{self.train_tokens} tokens trained, "
            f"padding {100 * self.padding_fraction:.1f}%"
        )


@dataclass
class SFTData:
    """Packed SFT blocks, shaped like a :class:`~lora_dapt.data.corpus.Corpus` so ``continued_pretrain`` takes it."""

    train: Any
    """datasets.Dataset of blocks: input_ids, position_ids, labels."""
    eval: Any | None
    stats: SFTDataStats
    eval_documents: list[str]
    """Rendered held-out conversations (the merge check scores them)."""


def _blocks(
    tokens: list[list[int]], labels: list[list[int]], seq_len: int, pad_id: int, packing: bool
) -> list:
    if packing:
        return pack_documents(tokens, seq_len, pad_id, labels)
    out: list[dict[str, list[int]]] = []
    for ids, lab in zip(tokens, labels, strict=True):  # one conversation per block
        out.extend(pack_documents([ids], seq_len, pad_id, [lab]))
    return out


def prepare_sft_data(
    data: str | Path | Sequence[str | Path] | Sequence[dict[str, Any]] | Any,
    tokenizer: Any,
    config: SFTConfig | None = None,
) -> SFTData:
    """Read, validate, tokenize (assistant-only labels), split by conversation and pack instruction data.

    Gives the tokenizer :data:`DEFAULT_CHAT_TEMPLATE` if it has no chat template.

    Example::

        data = prepare_sft_data("examples/sft_toy.jsonl", tok, SFTConfig(seq_len=256))
        print(data.stats.summary())
    """
    from datasets import Dataset
    from jinja2.exceptions import TemplateError

    cfg = config or SFTConfig()
    convs = load_conversations(data, cfg.format)
    stats = SFTDataStats(rows=len(convs), chat_template=ensure_chat_template(tokenizer))
    for c in convs:
        stats.formats.setdefault(c.where.rsplit(" ", 2)[0], c.format)
        stats.trailing_turns_dropped += c.trimmed_turns
    kept: list[tuple[Conversation, list[int], list[int]]] = []
    problems = []
    for c in convs:
        try:
            ids, labels = tokenize_conversation(tokenizer, c.messages, train_on_prompt=cfg.train_on_prompt)
        except DataError as e:
            problems.append(f"{c.where}: {e}")
            continue
        except TemplateError as e:  # e.g. a template that demands alternating user/assistant turns
            problems.append(f"{c.where}: the chat template refused this row ({e})")
            continue
        if len(ids) > cfg.seq_len:
            stats.dropped_too_long += 1
            if len(stats.dropped_examples) < 5:
                stats.dropped_examples.append(f"{c.where} ({len(ids)} tokens)")
            continue
        kept.append((c, ids, labels))
    if problems:
        raise_row_problems(problems, len(convs))
    if stats.dropped_too_long:
        log.warning(
            "dropped %d conversation(s) longer than sft.seq_len = %d tokens, e.g. %s; raise seq_len to keep them",
            stats.dropped_too_long,
            cfg.seq_len,
            ", ".join(stats.dropped_examples),
        )
    if not kept:
        raise DataError(
            f"every conversation is longer than sft.seq_len = {cfg.seq_len} tokens; raise sft.seq_len"
        )
    held = held_out(len(kept), cfg.eval_fraction, cfg.seed)
    eval_idx, train_idx = sorted(held), [i for i in range(len(kept)) if i not in held]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def build(idx: list[int]) -> list[dict[str, list[int]]]:
        return _blocks([kept[i][1] for i in idx], [kept[i][2] for i in idx], cfg.seq_len, pad, cfg.packing)

    train_blocks = build(train_idx)
    eval_blocks = build(eval_idx) if eval_idx else []
    stats.conversations_train, stats.conversations_eval = len(train_idx), len(eval_idx)
    stats.train_tokens = sum(len(kept[i][1]) for i in train_idx)
    stats.trained_tokens = sum(sum(x != IGNORE_INDEX for x in b["labels"]) for b in train_blocks)
    stats.train_blocks, stats.eval_blocks = len(train_blocks), len(eval_blocks)
    stats.padding_fraction = 1 - stats.train_tokens / max(1, len(train_blocks) * cfg.seq_len)
    return SFTData(
        train=Dataset.from_list(train_blocks),
        eval=Dataset.from_list(eval_blocks) if eval_blocks else None,
        stats=stats,
        eval_documents=[_render(tokenizer, kept[i][0].messages) for i in eval_idx],
    )
