"""Knowledge probes: does the model prefer the right continuation? Accuracy before and after training.

Perplexity says the model got better at the domain's text; a probe asks whether it knows a fact of it. A
probe file (``eval.probes``) is JSON Lines, one probe a line::

    {"prompt": "The relief valve opens at", "answer": " 8 bar", "distractors": [" 2 bar", " 20 bar"],
     "split": "domain"}

Each continuation (the answer and every distractor) is scored by its TOTAL log-probability given the prompt:
the sum over its tokens of log p(token | prompt, the tokens before it), from the one loss
(:func:`~lora_dapt.model.loss.causal_lm_loss_sum`). A probe is answered correctly when the answer's total is
the highest (a tie counts as wrong). Total, not length-normalised: it is the likelihood of the whole
continuation, which is what "the model would say this" means; the price is a bias toward short
continuations, so write distractors of about the answer's length. The continuation is appended to the
prompt as written: put the space between them where the text has one (at the start of each continuation,
as above). The prompt is tokenized with the tokenizer's special tokens (BOS), the continuation without, and
the two token lists are joined, so a continuation's tokens are the same in every probe.

``split`` (default ``domain``) groups the accuracy: ``domain`` facts should be learned, ``general`` ones
kept. :func:`load_probes` checks every row before any model runs (a bad row is a
:class:`~lora_dapt.errors.DataError` naming its line and the fix).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..model.loss import causal_lm_loss_sum
from .score import _scoring, model_device

log = logging.getLogger("lora_dapt")

SPLITS = ("domain", "general")
"""The groups a probe can belong to."""

_KEYS = {"prompt", "answer", "distractors", "split"}


@dataclass(frozen=True)
class Probe:
    """One probe: a prompt, its right continuation and the wrong ones."""

    prompt: str
    answer: str
    distractors: tuple[str, ...]
    split: str = "domain"
    line: int = 0
    """Its line in the probe file (1-based), for messages."""


@dataclass(frozen=True)
class ProbeSet:
    """The probes of one file, and the file's sha256 (so a resumed run can tell the probes changed)."""

    path: str
    probes: tuple[Probe, ...]
    sha256: str


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"a probe must be a JSON object, got {type(row).__name__}"
    unknown = sorted(set(row) - _KEYS)
    if unknown:
        return f"unknown key(s) {unknown}; a probe has prompt, answer, distractors and optionally split"
    for key in ("prompt", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"'{key}' must be a non-empty string"
    distractors = row.get("distractors")
    if not isinstance(distractors, list) or not distractors:
        return "'distractors' must be a non-empty list of strings (the wrong continuations)"
    if not all(isinstance(d, str) and d.strip() for d in distractors):
        return "every distractor must be a non-empty string"
    if row["answer"] in distractors:
        return "the answer is also listed among the distractors"
    if row.get("split", "domain") not in SPLITS:
        return f"'split' = {row.get('split')!r}: must be one of {list(SPLITS)}"
    return None


def load_probes(path: str | Path) -> ProbeSet:
    """Read and check a probe file (see the module docstring for its rows).

    Raises :class:`DataError` for a missing or empty file and for the first bad row, naming its line, what is
    wrong and the fix.

    Example::

        probes = load_probes("probes.jsonl")
        len(probes.probes)
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"eval.probes = {str(path)!r}: no such file; give a .jsonl file of probes or null")
    raw = p.read_bytes()
    probes = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}, line {number}: not valid JSON ({e.msg}); write one JSON object a line"
            ) from None
        problem = _row_problem(row)
        if problem:
            raise DataError(
                f"{p}, line {number}: {problem}. Fix the row, e.g. "
                '{"prompt": "The valve opens at", "answer": " 8 bar", "distractors": [" 2 bar"]}'
            )
        probes.append(
            Probe(row["prompt"], row["answer"], tuple(row["distractors"]), row.get("split", "domain"), number)
        )
    if not probes:
        raise DataError(f"{p}: holds no probes; write one JSON object a line, or set eval.probes: null")
    return ProbeSet(str(p), tuple(probes), hashlib.sha256(raw).hexdigest())


def continuation_logprob(model: Any, tokenizer: Any, prompt: str, continuation: str) -> float:
    """Total log-probability (nats) of ``continuation`` after ``prompt``: minus the summed loss over the
    continuation's tokens. Call under ``_scoring`` (eval mode, no grad)."""
    context = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if not cont:
        raise DataError(f"the continuation {continuation!r} tokenizes to nothing; give a non-empty one")
    device = model_device(model)
    ids = torch.tensor([context + cont], dtype=torch.long, device=device)  # [1, len]
    labels = torch.tensor([[-100] * len(context) + cont], dtype=torch.long, device=device)
    total, _ = causal_lm_loss_sum(model, ids, labels)
    return -float(total.detach())


def score_probes(model: Any, tokenizer: Any, probes: ProbeSet) -> dict[str, Any]:
    """Accuracy of ``model`` on ``probes``, per split present: ``{"domain": {"accuracy", "correct",
    "total"}, ..., "file", "sha256", "wrong": [line numbers of the probes answered wrongly]}``."""
    counts = {split: [0, 0] for split in SPLITS}
    wrong = []
    with _scoring(model):
        for probe in probes.probes:
            answer = continuation_logprob(model, tokenizer, probe.prompt, probe.answer)
            best_other = max(
                continuation_logprob(model, tokenizer, probe.prompt, d) for d in probe.distractors
            )
            ok = answer > best_other
            counts[probe.split][0] += int(ok)
            counts[probe.split][1] += 1
            if not ok:
                wrong.append(probe.line)
    out: dict[str, Any] = {
        split: {"accuracy": c / n, "correct": c, "total": n} for split, (c, n) in counts.items() if n
    }
    for split in SPLITS:
        if split in out:
            r = out[split]
            log.info(
                "probes %s: %d / %d right (%.1f%%)", split, r["correct"], r["total"], 100 * r["accuracy"]
            )
    return {**out, "file": probes.path, "sha256": probes.sha256, "wrong": wrong}


def probes_report(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Per split: ``{"accuracy_before", "accuracy_after", "correct_before", "correct_after", "total"}``, and
    ``"note"`` when before and after scored different probe files (a resume with other probes)."""
    before, after = before or {}, after or {}
    out: dict[str, Any] = {}
    for split in SPLITS:
        b, a = before.get(split) or {}, after.get(split) or {}
        if b or a:
            out[split] = {
                "accuracy_before": b.get("accuracy"),
                "accuracy_after": a.get("accuracy"),
                "correct_before": b.get("correct"),
                "correct_after": a.get("correct"),
                "total": a.get("total", b.get("total")),
            }
    if before.get("sha256") and after.get("sha256") and before["sha256"] != after["sha256"]:
        out["note"] = "before and after scored different probe files: the accuracies are not comparable"
    return out
