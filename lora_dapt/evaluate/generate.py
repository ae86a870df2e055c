"""The one greedy generator: plain continuations (:func:`generate_samples`) and chat answers
(:func:`generate_chat`).

Greedy decoding (no sampling, one beam) so that before/after samples differ only because the model did:
the same weights give the same text on every call. Both entry points tokenize their prompt the same way
(``tokenizer(text)``, special tokens included, as training saw them) and decode only the new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.chat import chat_prompt
from .score import _scoring, model_device


def _greedy(
    model: Any, tokenizer: Any, text: str, max_new_tokens: int, eos_token_id: int | None = None
) -> Any:
    """The ids generated after ``text`` (a 1-D tensor); call under ``_scoring(model)``.

    ``eos_token_id`` None keeps the model's generation config's EOS (a base model's own stop token); a chat
    model passes the tokenizer's, which its chat template ends each turn with.
    """
    enc = tokenizer(text, return_tensors="pt").to(model_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Given only when set: generate() copies every keyword into the generation config, None included.
    stop = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, **stop
    )
    return out[0, enc["input_ids"].shape[1] :]


def generate_chat(
    model: Any, tokenizer: Any, prompt: str | list[dict[str, str]], max_new_tokens: int = 64
) -> str:
    """Greedy answer of a chat model to ``prompt`` (a user message or a list of messages), special tokens
    removed; generation stops at the tokenizer's EOS.

    Example::

        generate_chat(model, tok, "Which field is the word 'dose' from?")   # 'medicine'
    """
    with _scoring(model):
        new = _greedy(
            model, tokenizer, chat_prompt(tokenizer, prompt), max_new_tokens, tokenizer.eos_token_id
        )
    return tokenizer.decode(new, skip_special_tokens=True)


def generate_samples(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48
) -> list[dict[str, Any]]:
    """Greedy (deterministic) continuations of each prompt: ``[{"prompt", "completion", "new_tokens"}]``.

    Prompts are generated one at a time, so no padding side or pad token can change the result.

    Example::

        before = generate_samples(model, tok, ["The patient was given"], max_new_tokens=32)
    """
    out = []
    with _scoring(model):
        for prompt in prompts:
            new = _greedy(model, tokenizer, prompt, max_new_tokens)
            completion = tokenizer.decode(new, skip_special_tokens=True)
            out.append({"prompt": prompt, "completion": completion, "new_tokens": int(new.numel())})
    return out
