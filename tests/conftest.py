"""Offline fixtures: a tiny random Llama and a byte-level BPE tokenizer trained here, saved to disk.

Nothing is downloaded. The model is small enough that a QLoRA step on 2 CPU cores takes milliseconds.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = (
    "patient dose renal hepatic tablet infusion clinical trial adverse event cardiac statute court appeal "
    "plaintiff contract clause tenant liability torque valve pump manual firmware sensor calibrate voltage "
    "the a of and to in is was for on with as by at from that this which be are it"
).split()


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def build_tokenizer(out_dir: Path, *, with_pad: bool = False):
    """Train a tiny byte-level BPE tokenizer (vocab 320) and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<unk>"] + (["<pad>"] if with_pad else [])
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [make_text(200, s) for s in range(50)] + ["Hello world. Ünïcödé ✓ 123 \n\t code()"]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if with_pad else None,
    )
    fast.add_bos_token = True
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, vocab_size: int, *, tie: bool = False, seed: int = 0, hidden: int = 64):
    """A 2-layer Llama with random weights (hidden 64 unless told), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=tie,
        # a wider init than the default 0.02: with a frozen 64-wide head, 0.02 caps how far the logits
        # can move, and LoRA could not fit even a repeated sentence
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory with a tiny random Llama (untied head) and a tokenizer that has NO pad token."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = build_tokenizer(d)
    build_model(d, len(tok))
    return d


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """Same as tiny_model_dir but with tied input/output embeddings."""
    d = tmp_path_factory.mktemp("tiny_llama_tied")
    tok = build_tokenizer(d)
    build_model(d, len(tok), tie=True)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def domain_files(tmp_path) -> list[Path]:
    """A few small domain text files (distinct documents)."""
    paths = []
    for i in range(12):
        p = tmp_path / f"doc{i:02d}.txt"
        p.write_text(make_text(40 + 7 * i, seed=1000 + i), encoding="utf-8")
        paths.append(p)
    return paths
