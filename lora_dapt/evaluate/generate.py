"""evaluate.generate (split from evaluate, sft)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.chat import chat_prompt
from .score import _scoring, model_device


def generate_chat(
    model: Any, tokenizer: Any, prompt: str | list[dict[str, str]], max_new_tokens: int = 64
) -> str:
    """Greedy answer of a chat model to ``prompt`` (a user message or a list of messages), special tokens
    removed; generation stops at EOS.

    Example::

        generate_chat(model, tok, "Which field is the word 'dose' from?")   # 'medicine'
    """
    import torch

    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    enc = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    if was_training:
        model.train()
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_samples(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48
) -> list[dict[str, Any]]:
    """Greedy (deterministic) continuations of each prompt: ``[{"prompt", "completion", "new_tokens"}]``.

    Prompts are generated one at a time, so no padding side or pad token can change the result.

    Example::

        before = generate_samples(model, tok, ["The patient was given"], max_new_tokens=32)
    """
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with _scoring(model):
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
            new = gen[0, enc["input_ids"].shape[1] :]
            out.append(
                {
                    "prompt": prompt,
                    "completion": tokenizer.decode(new, skip_special_tokens=True),
                    "new_tokens": int(new.numel()),
                }
            )
    return out
