"""SFT rows -> validated :class:`Conversation` objects: the four row formats, their detection and checks.

Rows come from ``.jsonl``/``.json`` files, globs or directories (resolved by
:func:`lora_dapt.data.sources.resolve_path`, read by :mod:`lora_dapt.data.formats`), or from memory (a list
of dicts, a ``datasets.Dataset``). Nothing is skipped silently: every malformed row (invalid JSON, bytes that
are not UTF-8, a row in no format or in another format than its file's, a bad turn) is collected with its
file and line, and all of them are raised as one :class:`DataError`.

Four row formats, detected per file from its first row (or forced with ``SFTConfig.format``) and
checked on every row; every malformed row is reported with its file and line number, all at once:

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ``prompt_completion``: ``{"prompt": "...", "completion": "..."}`` (or trl's conversational lists)
* ``alpaca``: ``{"instruction": "...", "input": "..." (optional), "output": "...", "system": (optional)}``
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .formats import json_rows, jsonl_rows
from .sources import resolve_path

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


_EXTENSIONS = (".jsonl", ".json")


def _files(paths: Sequence[str | Path]) -> list[str]:
    """The files named by paths, globs and directories (.jsonl/.json only, in a directory); each must name
    at least one."""
    out: list[str] = []
    for p in paths:
        found = resolve_path(p, _EXTENSIONS)
        odd = [s for s in found.skipped if s.kind == "not_regular"]
        if odd:
            raise DataError(f"sft data: {odd[0].name} is {odd[0].detail}; give .jsonl/.json files")
        if not found.files:
            if found.kind == "glob":
                raise DataError(f"sft data: no file matches {found.spec!r}")
            if found.kind == "directory":
                raise DataError(f"sft data: directory {found.spec} holds no .jsonl or .json files")
            raise DataError(
                f"sft data: file not found: {found.spec} (give .jsonl/.json files, globs or directories)"
            )
        out += found.files
    return out


def _file_rows(path: str, problems: list[str]) -> list[tuple[str, Any]]:
    """(where, row) pairs of a .json file (an array of objects, or one object) or a JSON Lines file (any
    other name); rows and files that cannot be read go to ``problems``."""
    reader = json_rows if path.lower().endswith(".json") else jsonl_rows
    rows = []
    try:
        for r in reader(path, errors="strict"):
            where = f"{path} line {r.line}" if r.line is not None else f"{path} item {(r.index or 0) + 1}"
            if r.error is not None:
                problems.append(f"{where}: {r.error}")
            else:
                rows.append((where, r.value))
    except json.JSONDecodeError as e:
        problems.append(f"{path} line {e.lineno}: not valid JSON ({e.msg})")
        return []
    except UnicodeDecodeError as e:
        problems.append(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
        return []
    except OSError as e:
        problems.append(f"{path}: cannot be read ({e})")
        return []
    return rows


def _keys(row: Any) -> list[str] | str:
    """What a row holds, for messages: its sorted keys, or its type when it is no object."""
    return sorted(row) if isinstance(row, dict) else type(row).__name__


def raise_row_problems(problems: list[str], total: int) -> None:
    """Raise every problem (the first MAX_REPORTED listed, the rest counted) as one DataError."""
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
        for path in _files(items):
            sources.append((path, _file_rows(path, problems)))
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
                    problems.append(
                        f"{name}: no row is in a known format (first row has {_keys(rows[0][1])}); expected "
                        + " | ".join(_FORMAT_KEYS.values())
                    )
                continue
        for where, row in rows:
            found = detect_format(row)
            if found is None:
                problems.append(
                    f"{where}: a row in none of the formats (keys {_keys(row)}); a {fmt} row has "
                    f"{_FORMAT_KEYS[fmt]}"
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
        raise_row_problems(problems, total)
    if not out:
        raise DataError("the SFT data is empty: no rows found. Check sft.data.")
    return out
