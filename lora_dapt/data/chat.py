"""data.chat (split from sft)."""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import SFTConfig
from ..errors import ConfigError, DataError, ModelLoadError
from .packing import IGNORE_INDEX, pack_documents

log = logging.getLogger("lora_dapt")

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt")


ROLES = ("system", "user", "assistant")


SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


MAX_REPORTED = 20
"""Malformed rows listed in one DataError (the rest are counted)."""


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


@dataclass
class Conversation:
    """One validated row as chat messages, and where it came from (for error messages)."""

    messages: list[dict[str, str]]
    where: str
    """'path line N' (jsonl), 'path item N' (json array) or 'row N' (in-memory rows)."""
    format: str
    trimmed_turns: int = 0
    """Non-assistant turns after the last assistant turn, dropped (nothing to learn from them)."""


def detect_format(row: Any) -> str | None:
    """The format a row is written in, from its keys; None when it is in none of them.

    >>> detect_format({"instruction": "Add 2 and 3.", "output": "5"})
    'alpaca'
    >>> detect_format({"text": "plain"}) is None
    True
    """
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


_FORMAT_KEYS = {
    "messages": "'messages' (a list of {role, content})",
    "prompt_completion": "'prompt' and 'completion'",
    "alpaca": "'instruction', 'output' and optionally 'input'",
    "sharegpt": "'conversations' (a list of {from, value})",
}


def _check_messages(messages: Any) -> tuple[list[dict[str, str]], int, list[str]]:
    """Validate chat messages: (clean messages, trailing turns dropped, problems)."""
    if not isinstance(messages, list) or not messages:
        return [], 0, ["expected a non-empty list of turns"]
    problems: list[str] = []
    clean: list[dict[str, str]] = []
    for k, turn in enumerate(messages, start=1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            problems.append(f"turn {k}: expected an object with 'role' and 'content'")
            continue
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            problems.append(f"turn {k}: unknown role {role!r}; use one of {', '.join(ROLES)}")
            continue
        if not isinstance(content, str):
            problems.append(f"turn {k}: content must be text, got {type(content).__name__}")
            continue
        if role == "system" and k != 1:
            problems.append(f"turn {k}: a system turn is only allowed first; merge it into the first turn")
        if role == "assistant" and not content.strip():
            problems.append(f"turn {k}: empty assistant turn; fill in the answer or remove the row")
        clean.append({"role": role, "content": content})
    if problems:
        return [], 0, problems
    last = max((i for i, m in enumerate(clean) if m["role"] == "assistant"), default=None)
    if last is None:
        return [], 0, ["no assistant turn: nothing to learn from this row"]
    return clean[: last + 1], len(clean) - last - 1, []


def _text_field(row: dict[str, Any], key: str, problems: list[str], *, required: bool = True) -> str:
    value = row.get(key, "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problems.append(f"'{key}' must be text, got {type(value).__name__}")
        return ""
    return value


def row_to_messages(row: dict[str, Any], fmt: str) -> tuple[list[dict[str, str]], int, list[str]]:
    """Turn one row of format ``fmt`` into checked chat messages: (messages, trailing turns dropped, problems).

    >>> row_to_messages({"prompt": "2+3?", "completion": "5"}, "prompt_completion")[0]
    [{'role': 'user', 'content': '2+3?'}, {'role': 'assistant', 'content': '5'}]
    """
    from trl.data_utils import is_conversational, maybe_convert_to_chatml

    problems: list[str] = []
    if fmt == "messages":
        return _check_messages(row["messages"])
    if fmt == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            return [], 0, ["'conversations' must be a list of {from, value} objects"]
        converted = maybe_convert_to_chatml({"conversations": [dict(t) for t in turns]})["messages"]
        for k, turn in enumerate(converted, start=1):
            role = turn.get("role")
            if role not in SHAREGPT_ROLES:
                problems.append(
                    f"turn {k}: unknown role (from) {role!r}; use one of {', '.join(SHAREGPT_ROLES)}"
                )
            else:
                turn["role"] = SHAREGPT_ROLES[role]
        if problems:
            return [], 0, problems
        return _check_messages(converted)
    if fmt == "prompt_completion":
        if is_conversational(row):  # trl's conversational prompt/completion: lists of messages
            prompt, completion = row["prompt"], row["completion"]
            if not isinstance(prompt, list) or not isinstance(completion, list):
                return [], 0, ["conversational 'prompt' and 'completion' must both be lists of messages"]
            return _check_messages(prompt + completion)
        prompt = _text_field(row, "prompt", problems)
        completion = _text_field(row, "completion", problems)
        if problems:
            return [], 0, problems
        return _check_messages(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        )
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction", problems)
        extra = _text_field(row, "input", problems, required=False)
        output = _text_field(row, "output", problems)
        system = _text_field(row, "system", problems, required=False)
        if not problems and not instruction.strip():
            problems.append("empty 'instruction'")
        if problems:
            return [], 0, problems
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
        return _check_messages(msgs)
    raise ValueError(f"unknown format {fmt!r}")


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        text = os.path.expanduser(str(p))
        if any(c in text for c in "*?["):
            found = sorted(Path(m) for m in glob.glob(text, recursive=True))
            if not found:
                raise DataError(f"sft data: no file matches {text!r}")
            out.extend(found)
        elif Path(text).is_dir():
            found = sorted(q for q in Path(text).rglob("*") if q.suffix in (".jsonl", ".json"))
            if not found:
                raise DataError(f"sft data: directory {text} holds no .jsonl or .json files")
            out.extend(found)
        elif Path(text).is_file():
            out.append(Path(text))
        else:
            raise DataError(
                f"sft data: file not found: {text} (give .jsonl/.json files, globs or directories)"
            )
    return out


def _read_file(path: Path, problems: list[str]) -> list[tuple[str, Any]]:
    """(where, row) pairs of a .jsonl (one object per line) or .json file (a list of objects)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{path} line {e.lineno}: not valid JSON ({e.msg})")
            return []
        return [(f"{path} item {i}", row) for i, row in enumerate(items, start=1)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"{path} line {n}: not valid JSON ({e.msg})")
    return rows


def _raise_problems(problems: list[str], total: int) -> None:
    shown = problems[:MAX_REPORTED]
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    raise DataError(
        f"{len(problems)} malformed row(s) in the SFT data ({total} rows read); fix or remove them:\n  - "
        + "\n  - ".join(shown)
        + more
    )


def load_conversations(
    data: str | Path | Sequence[str | Path] | Sequence[dict[str, Any]] | Any, format: str = "auto"
) -> list[Conversation]:
    """Read instruction rows (files, globs, directories, a list of dicts or a ``datasets.Dataset``), detect or
    check their format, validate every row and return them as chat messages.

    Every problem (invalid JSON, a row in none of the formats, a row of another format than the file's, an
    unknown role, an empty assistant turn, no assistant turn) is collected and raised as one
    :class:`DataError` listing each row with its line number.

    Example::

        convs = load_conversations("examples/sft_toy.jsonl")
        convs[0].messages   # [{'role': 'system', ...}, {'role': 'user', ...}, {'role': 'assistant', ...}]
    """
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"sft.format = {format!r}: use 'auto' or one of {', '.join(FORMATS)}")
    problems: list[str] = []
    sources: list[tuple[str, list[tuple[str, Any]]]] = []
    if isinstance(data, (str, Path)):
        data = [data]
    items = list(data)
    if items and all(isinstance(x, (str, Path)) for x in items):
        for path in _expand(items):
            sources.append((str(path), _read_file(path, problems)))
    else:  # in-memory rows (a list of dicts or a datasets.Dataset)
        sources.append(("rows", [(f"row {i}", row) for i, row in enumerate(items, start=1)]))
    out: list[Conversation] = []
    total = 0
    for name, rows in sources:
        total += len(rows)
        fmt = format
        if fmt == "auto":
            fmt = next((f for f in (detect_format(r) for _, r in rows) if f), "")
            if not fmt:
                if rows:
                    keys = sorted(rows[0][1]) if isinstance(rows[0][1], dict) else type(rows[0][1]).__name__
                    problems.append(
                        f"{name}: no row is in a known format (first row has {keys}); expected "
                        + " | ".join(_FORMAT_KEYS.values())
                    )
                continue
        for where, row in rows:
            found = detect_format(row)
            if found is None:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                problems.append(
                    f"{where}: a row in none of the formats (keys {keys}); a {fmt} row has {_FORMAT_KEYS[fmt]}"
                )
                continue
            if found != fmt:
                problems.append(
                    f"{where}: a row in {found} format, but {name} is in {fmt} format (its first row); "
                    "use one format per file"
                )
                continue
            messages, trimmed, row_problems = row_to_messages(row, fmt)
            problems.extend(f"{where}: {p}" for p in row_problems)
            if not row_problems:
                out.append(Conversation(messages, where, fmt, trimmed))
    if problems:
        _raise_problems(problems, total)
    if not out:
        raise DataError("the SFT data is empty: no rows found. Check sft.data.")
    return out


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
    """Packed SFT blocks, shaped like a :class:`~lora_dapt.corpus.Corpus` so ``continued_pretrain`` takes it."""

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
        _raise_problems(problems, len(convs))
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
    order = list(range(len(kept)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = round(cfg.eval_fraction * len(kept))
    if cfg.eval_fraction > 0 and len(kept) >= 2:
        n_eval = min(max(1, n_eval), len(kept) - 1)
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
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
