"""The one scorer: perplexity and bits per byte of held-out text, from raw texts or packed blocks.

Two ways to feed text, one definition of the number, one loss: both paths build ``labels`` (-100 where a
position is not a target) and sum the NLL with :func:`lora_dapt.model.loss.causal_lm_loss_sum`, the loss
training minimises, so the eval loss and the train loss are the same function of the same positions (and,
unless the head post-processes its logits, scoring never materialises ``[batch, seq, vocab]`` logits).

* :func:`evaluate_texts` takes raw strings. Each is tokenized with BOS (when the tokenizer adds one) and EOS,
  then scored with sliding windows of ``seq_len`` tokens. Every target token (every token but the first of
  a text) is scored exactly once; ``stride`` is how many new targets each window scores, so each target gets
  at least ``seq_len - stride`` tokens of left context (the first window aside). ``stride = seq_len - 1``
  (the default) is the cheapest: consecutive windows share one token, the one that predicts the next
  window's first target. A small stride costs ``seq_len / stride`` times more compute and gives every
  token a long context, i.e. a lower, fairer perplexity.
* :func:`evaluate_blocks` takes the packed blocks of :mod:`lora_dapt.data.packing` (``input_ids``,
  ``position_ids``, ``labels``) and scores the labels exactly as training does, so the eval loss is
  comparable to the train loss.

Both return an :class:`EvalResult`: the mean negative log-likelihood per target token in nats (``loss``),
``ppl = exp(loss)``, and ``bits_per_byte = total NLL / ln 2 / UTF-8 bytes``. Perplexity depends on the
tokenizer (a vocabulary with longer tokens has fewer, harder targets); bits per byte does not, so it is the
number to compare across models with different vocabularies. The EOS prediction is part of the NLL
(knowing where a document ends is part of modelling it); special tokens add no bytes.

Everything runs under ``torch.no_grad()`` in eval mode (restoring the model's previous mode afterwards), on
the device of the model's input embeddings, for plain, peft, 4-bit/8-bit and merged models alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.sources import read_text_sources
from ..errors import ConfigError, DataError
from ..model.loss import causal_lm_loss_sum

log = logging.getLogger("lora_dapt")


DEFAULT_MAX_SEQ_LEN = 1024


@dataclass
class EvalResult:
    """What one evaluation measured.

    Example::

        >>> r = EvalResult.from_totals(nll=2 * math.log(2) * 8, tokens=8, n_bytes=16)
        >>> r.loss, r.ppl, r.bits_per_byte   # 8 targets at 2 bits each over 16 bytes
        (1.3862943611198906, 4.0, 1.0)
    """

    loss: float
    """Mean negative log-likelihood per target token, in nats."""
    ppl: float
    """Perplexity, exp(loss)."""
    bits_per_byte: float | None
    """Total NLL in bits divided by the UTF-8 bytes of the text scored; None when the bytes are unknown."""
    tokens: int
    """Target tokens scored."""
    bytes: int | None
    """UTF-8 bytes of the text scored; None when unknown (packed blocks without a ``bytes`` column)."""
    elapsed_s: float = 0.0
    """Wall time of the evaluation."""

    @classmethod
    def from_totals(cls, nll: float, tokens: int, n_bytes: int | None, elapsed_s: float = 0.0) -> EvalResult:
        """Build from the summed NLL (nats) over ``tokens`` targets and the bytes they cover."""
        if tokens <= 0:
            raise DataError("nothing to evaluate: no target tokens (are the texts or blocks empty?)")
        loss = nll / tokens
        # exp overflows a float above ~709 nats; a random model never gets there, a diverged one can.
        ppl = math.exp(loss) if loss < 700 else math.inf
        bpb = nll / math.log(2) / n_bytes if n_bytes else None
        return cls(loss=loss, ppl=ppl, bits_per_byte=bpb, tokens=tokens, bytes=n_bytes, elapsed_s=elapsed_s)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the fields plus ``tokens_per_s``)."""
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def model_device(model: Any) -> torch.device:
    """Where input ids must go: the device of the input embeddings (right for device_map'd models too)."""
    with contextlib.suppress(AttributeError, NotImplementedError):
        return model.get_input_embeddings().weight.device
    return next(model.parameters()).device


def model_max_positions(model: Any) -> int | None:
    """The longest context the model's config declares, or None if it declares none."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def _scoring(model: Any) -> Iterator[None]:
    """Eval mode and no autograd; restore the caller's training mode afterwards.

    ``no_grad`` rather than ``inference_mode``: tensors a model caches lazily during an inference-mode
    forward (rotary tables, for instance) could not be used by autograd when training resumes.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _progress(total: int, desc: str, unit: str = "tok") -> Any:
    from ..progress import progress

    # A bar on a terminal; elsewhere a line only every 30 s (the log lines around the loop say what runs).
    return progress(total, desc, unit=unit, unit_scale=True, leave=False, every_fraction=None, every_s=30.0)


def _summed_nll(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[float, int]:
    """Summed NLL in nats over the targets of ``labels`` (``labels[t]`` is predicted at position t - 1;
    -100: not a target) and their count: the training loss, read as Python numbers. Call under _scoring."""
    total, n = causal_lm_loss_sum(model, input_ids, labels, position_ids)
    return (float(total) if n else 0.0), n


def sliding_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Plan the windows that score tokens ``1 .. n_tokens-1`` of a sequence, each exactly once.

    Returns ``(start, end, first_target)`` triples: the model reads ``ids[start:end]`` (at most ``seq_len``
    tokens) and the targets ``ids[first_target:end]`` are scored, each predicted from everything in the
    window before it. ``stride`` (new targets per window) is capped at ``seq_len - 1``, because a window of
    ``seq_len`` tokens makes only ``seq_len - 1`` predictions.

    Example::

        >>> sliding_windows(10, seq_len=4)            # stride 3: windows overlap by one token
        [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
        >>> sliding_windows(10, seq_len=4, stride=2)  # every target but the first sees >= 2 tokens
        [(0, 3, 1), (1, 5, 3), (3, 7, 5), (5, 9, 7), (6, 10, 9)]
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len = {seq_len}: must be >= 2 (one token of context and one target)")
    if stride is not None and stride < 1:
        raise ConfigError(f"stride = {stride}: must be >= 1 (new target tokens per window)")
    step = min(stride or seq_len, seq_len - 1)
    out = []
    first = 1
    while first < n_tokens:
        end = min(first + step, n_tokens)
        out.append((max(0, end - seq_len), end, first))
        first = end
    return out


def _tokenize_for_scoring(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def _prefix_bytes(tokenizer: Any, text: str, keep: int) -> int:
    """UTF-8 bytes of the text covered by its first ``keep`` tokens (BOS included), for a max_tokens cut.

    Fast tokenizers report character offsets, which makes this exact; otherwise the kept tokens are
    decoded, which can differ by a few bytes (a split multi-byte character, a stripped leading space).
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"][:keep]]
        return len(text[: max(ends, default=0)].encode("utf-8"))
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:keep]
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))


def evaluate_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    desc: str = "eval",
) -> EvalResult:
    """Score raw texts with sliding windows; see the module docstring for the definitions.

    Args:
        texts: the documents; each is scored on its own (no context crosses from one text to the next).
        seq_len: window length in tokens; default ``min(model max positions, 1024)``.
        stride: new target tokens per window, at most ``seq_len - 1`` (the default). Smaller: more context
            per token, ``seq_len / stride`` times the compute.
        batch_size: windows per forward pass. The loss computes the logits of the targets only, in chunks
            when they are large (see :mod:`lora_dapt.model.loss`).
        max_tokens: stop after this many target tokens. The text where the cut falls is scored up to the
            cut and its bytes are counted up to the end of the last scored token, so bits_per_byte stays
            honest.
        desc: label of the progress bar and log line.

    Example::

        r = evaluate_texts(model, tok, ["The court held that ...", "Dosage was ..."], seq_len=512)
        print(f"ppl {r.ppl:.2f}, {r.bits_per_byte:.3f} bits/byte over {r.tokens} tokens")
    """
    if isinstance(texts, (str, bytes)):
        raise DataError("texts must be a list of strings; wrap a single text in a list: [text]")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size}: must be >= 1")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens = {max_tokens}: must be >= 1 or None")
    if seq_len is None:
        seq_len = min(model_max_positions(model) or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)

    # Tokenize, cut at max_tokens, count bytes.
    docs: list[list[int]] = []
    n_bytes = 0
    budget = max_tokens if max_tokens is not None else math.inf
    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"texts must be strings, got {type(text).__name__}")
        ids = _tokenize_for_scoring(tokenizer, text)
        if len(ids) < 2:  # nothing to predict (an empty text without BOS)
            continue
        if len(ids) - 1 > budget:
            keep = int(budget) + 1
            docs.append(ids[:keep])
            n_bytes += _prefix_bytes(tokenizer, text, keep)
            break
        docs.append(ids)
        n_bytes += len(text.encode("utf-8"))
        budget -= len(ids) - 1
        if budget <= 0:
            break

    # (doc, start, end, first_target); the longest windows first so that a batch wastes little on padding.
    windows = [(d, *w) for d, ids in enumerate(docs) for w in sliding_windows(len(ids), seq_len, stride)]
    windows.sort(key=lambda w: w[2] - w[1], reverse=True)
    total_targets = sum(end - first for _, _, end, first in windows)
    if total_targets == 0:
        raise DataError(f"{desc}: nothing to evaluate ({len(texts)} texts gave no target tokens)")
    log.info(
        "%s: scoring %d tokens of %d texts in %d windows (seq_len=%d, stride=%d)",
        desc,
        total_targets,
        len(docs),
        len(windows),
        seq_len,
        min(stride or seq_len, seq_len - 1),
    )

    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    nll = 0.0
    start_time = time.perf_counter()
    with _scoring(model), _progress(total_targets, desc) as bar:
        for b in range(0, len(windows), batch_size):
            batch = windows[b : b + batch_size]
            width = batch[0][2] - batch[0][1]
            rows = [docs[d][s:e] + [pad] * (width - (e - s)) for d, s, e, _ in batch]
            # Targets ids[first:e] of a window sit at columns first-s .. e-s-1; the window's context
            # (columns before first-s) and the right padding are not targets.
            labels = [
                [-100] * (first - s) + docs[d][first:e] + [-100] * (width - (e - s))
                for d, s, e, first in batch
            ]
            # No attention mask: padding sits at the right end and attention is causal, so real tokens never
            # see it; passing none also keeps every attention kernel on its plain causal path.
            batch_nll, _ = _summed_nll(
                model,
                torch.tensor(rows, dtype=torch.long, device=device),  # [B, width]
                torch.tensor(labels, dtype=torch.long, device=device),  # [B, width]
            )
            nll += batch_nll
            bar.update(sum(e - first for _, _, e, first in batch))
    result = EvalResult.from_totals(nll, total_targets, n_bytes, time.perf_counter() - start_time)
    _log_result(desc, result)
    return result


def _log_result(desc: str, r: EvalResult) -> None:
    bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "n/a"
    log.info(
        "%s: loss %.4f, ppl %.3f, bits/byte %s over %d tokens (%.1f tok/s)",
        desc,
        r.loss,
        r.ppl,
        bpb,
        r.tokens,
        r.tokens_per_s or 0.0,
    )


def evaluate_blocks(
    model: Any,
    dataset: Any,
    batch_size: int = 4,
    max_blocks: int | None = None,
    desc: str = "eval",
    max_tokens: int | None = None,
) -> EvalResult:
    """Score a dataset of packed blocks the way training does.

    Each row has ``input_ids``, ``position_ids`` (restarting at 0 at every document start, which is how
    transformers keeps packed documents apart when no attention mask is passed) and ``labels`` (-100 where
    nothing is scored). As in transformers and in training's loss, ``logits[t]`` predicts ``labels[t + 1]``:
    the loss is :func:`~lora_dapt.model.loss.causal_lm_loss_sum` over the same blocks. Blocks of unequal
    length are right-padded with labels -100. ``bits_per_byte`` is reported only when the dataset has a
    ``bytes`` column (UTF-8 bytes covered by each block's labels).

    Args:
        max_blocks: score only the first this many blocks.
        max_tokens: stop after the block in which the scored-token count reaches this (whole blocks).

    Example::

        r = evaluate_blocks(model, corpus.eval, batch_size=8)
    """
    names = set(getattr(dataset, "column_names", None) or [])
    missing = {"input_ids", "labels"} - names
    if missing:
        raise DataError(
            f"evaluate_blocks needs columns input_ids, position_ids and labels; missing {sorted(missing)} "
            f"(columns: {sorted(names)}). For raw text use evaluate_texts."
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size}: must be >= 1")
    n = len(dataset) if max_blocks is None else min(len(dataset), max_blocks)
    has_pos, has_bytes = "position_ids" in names, "bytes" in names
    log.info("%s: scoring %d packed blocks", desc, n)

    device = model_device(model)
    nll, tokens, n_bytes = 0.0, 0, 0
    start_time = time.perf_counter()
    with _scoring(model), _progress(n, desc, unit="block") as bar:
        for b in range(0, n, batch_size):
            rows = dataset[b : min(b + batch_size, n)]
            width = max(len(x) for x in rows["input_ids"])

            def padded(key: str, fill: int, rows: dict = rows, width: int = width) -> torch.Tensor:
                data = [list(x) + [fill] * (width - len(x)) for x in rows[key]]
                return torch.tensor(data, dtype=torch.long, device=device)

            # Padding gets label -100 (not a target) and position 0: read as one more, ignored, document
            # after the real ones.
            position_ids = padded("position_ids", 0) if has_pos else None
            batch_nll, batch_tokens = _summed_nll(
                model, padded("input_ids", 0), padded("labels", -100), position_ids
            )
            nll += batch_nll
            tokens += batch_tokens
            if has_bytes:
                n_bytes += sum(int(x) for x in rows["bytes"])
            bar.update(len(rows["input_ids"]))
            if max_tokens is not None and tokens >= max_tokens:
                break
    result = EvalResult.from_totals(
        nll, tokens, n_bytes if has_bytes else None, time.perf_counter() - start_time
    )
    _log_result(desc, result)
    return result


def score(
    model: Any,
    tokenizer: Any,
    data: Any,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    *,
    max_tokens: int | None = None,
    desc: str = "eval",
) -> EvalResult:
    """The full :class:`EvalResult` of ``model`` on any input :func:`perplexity` accepts.

    Texts, files, globs and datasets with a ``text`` column go to :func:`evaluate_texts`; datasets of packed
    blocks (an ``input_ids`` column) to :func:`evaluate_blocks`, which ignores ``seq_len`` and ``stride``.
    """
    columns = getattr(data, "column_names", None)
    paths = isinstance(data, (list, tuple)) and all(isinstance(t, (str, Path)) for t in data)
    if isinstance(data, (str, Path)) or (paths and not all(isinstance(t, str) for t in data)):
        data = read_text_sources(data)  # a path, glob or directory, or a list of them (a list of str: texts)
    elif isinstance(columns, list):
        if "input_ids" in columns:
            return evaluate_blocks(model, data, batch_size, desc=desc, max_tokens=max_tokens)
        if "text" not in columns:
            raise DataError(f"a dataset to evaluate needs an input_ids or a text column; it has {columns}")
        data = list(data["text"])
    elif not paths:
        raise DataError(
            f"cannot evaluate a {type(data).__name__}: give a list of strings, a file/directory/glob path, or "
            "a datasets.Dataset with input_ids (packed blocks) or text"
        )
    return evaluate_texts(model, tokenizer, data, seq_len, stride, batch_size, max_tokens, desc)


def _metric(result: EvalResult, metric: str) -> float:
    """One number of ``result``; bits per byte needs the byte count, which packed blocks may lack."""
    value = getattr(result, metric)
    if value is None:
        raise DataError(
            "bits per byte needs the byte count of the text: pass raw texts or files, or packed blocks with a "
            "'bytes' column"
        )
    return value


def perplexity(
    model: Any,
    tokenizer: Any,
    data: Any,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    *,
    max_tokens: int | None = None,
) -> float:
    """Perplexity of ``model`` on ``data``: exp(mean NLL per target token).

    ``data`` is a list of strings, a path / directory / glob of .txt/.md/.rst files (or a list of those),
    a ``datasets.Dataset`` of packed blocks (``input_ids``, ``labels``; ``seq_len``/``stride`` unused) or a
    ``datasets.Dataset`` with a ``text`` column. See :func:`evaluate_texts` for seq_len and stride, and
    :func:`score` for the whole :class:`EvalResult`.

    Example::

        ld.perplexity(model, tok, corpus.eval)                     # packed held-out blocks
        ld.perplexity(model, tok, "notes/*.md", stride=256)        # files, long context per token
    """
    args = (model, tokenizer, data, seq_len, stride, batch_size)
    return _metric(score(*args, max_tokens=max_tokens, desc="perplexity"), "ppl")


def bits_per_byte(
    model: Any,
    tokenizer: Any,
    texts: Any,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    *,
    max_tokens: int | None = None,
) -> float:
    """Bits per UTF-8 byte of ``texts`` (same inputs as :func:`perplexity`): comparable across tokenizers.

    Example::

        bits_per_byte(model_a, tok_a, texts), bits_per_byte(model_b, tok_b, texts)   # fair comparison
    """
    args = (model, tokenizer, texts, seq_len, stride, batch_size)
    return _metric(score(*args, max_tokens=max_tokens, desc="bits/byte"), "bits_per_byte")
