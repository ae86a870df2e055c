"""GGUF export: a merged model as one llama.cpp / Ollama / LM Studio file, verified after writing.

``export_gguf(source)`` reads a merged model directory (or a run directory's ``merged/``) tensor by tensor
from its safetensors, renames every tensor with the ``gguf`` package's tensor-name map, writes the
architecture parameters, the tokenizer (:mod:`~lora_dapt.export.gguf_vocab`) and the chat template as
metadata, and stores the weights as f16, bf16 or q8_0 (1-D tensors, the norms and biases, stay f32, as
llama.cpp's converter keeps them). Supported: the Llama family (``llama``; ``mistral`` is written as
llama.cpp's ``llama`` architecture, as llama.cpp does) and ``qwen2``.

Two layout facts matter for a correct file:

- Llama-family Q and K projections are stored permuted: llama.cpp applies rotary embeddings to
  interleaved pairs (GPT-J style) while transformers rotates the two halves of each head, so each head's
  rows are reordered ``[h, 2, d/2] -> [h, d/2, 2]`` (:func:`rope_permute`); transformers' GGUF loader undoes
  it on reading. Qwen2 rotates halves in llama.cpp too (NEOX style), so its weights are written as they are.
- A tied head has no ``output.weight``: llama.cpp (and transformers' reader) then use the embedding matrix.

Verification: the file is written as ``<path>.partial``, reloaded with transformers
(``from_pretrained(dir, gguf_file=...)``, dequantized to float32) and its tokenizer too, and scored against
the merged model (also float32) on the same held-out token ids: mean loss and perplexity of both, the
largest |logit difference| over the first :data:`COMPARE_TOKENS` positions, and whether the reloaded
tokenizer gives the same ids. The logit bound is ``16 * u * max(1, max |logit|)``, the loss bound
``4 * u`` nats, where ``u`` is the type's worst relative rounding of one weight (:data:`ROUNDING`): f16
``2^-11``, bf16 ``2^-8``, q8_0 ``1/127`` (q8_0 stores each block of 32 weights as int8 times one f16 scale
``max|block|/127``, so a weight is off by at most half a step, ``max|block|/254``, and a block's largest
weight is about twice a typical one). Only a file that passes
is renamed to ``<path>``; the numbers go to ``<path>.export_report.json`` either way.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..rundir import RunDir, write_json_atomic
from .gguf_vocab import GGUFVocab, read_vocab, with_user_defined
from .measure import FALLBACK_TEXTS, eval_sequences, max_abs_diff, score

log = logging.getLogger("lora_dapt")

TYPES = ("f16", "bf16", "q8_0")
"""The weight types ``export_gguf`` writes."""

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""transformers ``model_type`` -> the llama.cpp architecture it is written as."""

ROPE_PERMUTED = {"llama", "mistral"}
"""Model types whose Q/K rows are permuted for llama.cpp's interleaved rotary embedding."""

ROUNDING = {"f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 1.0 / 127}
"""Relative rounding of one weight by type. q8_0: half a step is 1/254 of the block's largest weight, and a
block's largest weight is about twice a typical one (Gaussian blocks of 32), so 1/127 of a typical weight."""

LOGIT_FACTOR, LOSS_FACTOR = 16.0, 4.0
"""Bounds: max |logit diff| <= LOGIT_FACTOR * u * max(1, max |logit|); |loss diff| <= LOSS_FACTOR * u."""

COMPARE_TOKENS = 256
EVAL_MAX_TOKENS = 4096
Q8_BLOCK = 32


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    """The .gguf file."""
    type: str
    """``"f16"``, ``"bf16"`` or ``"q8_0"``."""
    size_bytes: int
    modelfile: Path
    """The Ollama Modelfile beside it (``<name>.Modelfile``; ``ollama create NAME -f`` it)."""
    report: dict[str, Any] = field(default_factory=dict)
    """The verification (also ``<path>.export_report.json``): perplexity of the merged model and of the
    reloaded GGUF on the same held-out tokens, max |logit diff|, the bounds used, ``passed``."""


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' Q/K layout -> llama.cpp's: per head, rows ``[2, d/2]`` become ``[d/2, 2]``.

    Example: one head of 4 rows [a0, a1, b0, b1] (halves a, b) becomes [a0, b0, a1, b1].
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# Source and output
# ---------------------------------------------------------------------------------------------------------------


def resolve_source(source: str | Path) -> tuple[Path, RunDir | None]:
    """(merged model directory, its run or None): a run directory gives its ``merged/``."""
    p = Path(source).expanduser()
    if RunDir.is_run(p) or (p / "metrics.jsonl").is_file():
        run = RunDir(p)
        if not (run.merged_dir / "config.json").is_file():
            raise ExportError(f"{p} has no merged model ({run.merged_dir}): run `lora-dapt merge {p}` first")
        return run.merged_dir, run
    if not (p / "config.json").is_file():
        raise ExportError(
            f"{p} is neither a merged model directory (config.json + safetensors) nor a run directory"
        )
    return p, None


def default_output(merged: Path, run: RunDir | None, type: str) -> Path:
    """``RUN/<run name>-<type>.gguf`` for a run, else ``<merged dir>-<type>.gguf`` beside the merged dir."""
    name = (run.path if run is not None else merged).resolve().name
    return (run.path if run is not None else merged.resolve().parent) / f"{name}-{type}.gguf"


def _weight_files(merged: Path) -> list[Path]:
    files = sorted(merged.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{merged} holds no .safetensors weights (save the model with safe_serialization)")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _hparams(config: Any) -> dict[str, Any]:
    if config.model_type not in ARCHITECTURES:
        raise ExportError(
            f"GGUF export does not support model type {config.model_type!r}; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (the Llama family: SmolLM2, Llama 3, Mistral; and Qwen2)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ExportError(
            f"rope scaling {rope_type!r} is not written by the GGUF export yet (only unscaled rotary "
            "embeddings: SmolLM2, Llama 3.0, Mistral, Qwen2)"
        )
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return {
        "n_head": n_head,
        "n_kv": getattr(config, "num_key_value_heads", None) or n_head,
        "head_dim": head_dim,
        "theta": float(theta),
    }


def _add_metadata(
    writer: Any, config: Any, hp: dict[str, Any], vocab: GGUFVocab, name: str, type: str
) -> None:
    import gguf

    if name == "mistral":
        # transformers' reader turns a llama file whose general.name is exactly "mistral" into a Mistral,
        # then looks "mistral" up in gguf-py's architecture names, which have none: the reload fails
        name = "mistral-merged"
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_kv"])
    writer.add_rope_freq_base(hp["theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != config.hidden_size // hp["n_head"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[type]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)


def _encode(data: torch.Tensor, type: str, hf_name: str) -> tuple[np.ndarray, Any, str]:
    """(array, raw GGML type or None, type name) for one tensor; 1-D stays f32; a q8_0 row that is not a
    multiple of 32 falls back to f16 (as llama.cpp does)."""
    import gguf

    arr = data.to(torch.float32).numpy()
    if arr.ndim <= 1:
        return arr, None, "f32"
    if type == "q8_0" and arr.shape[-1] % Q8_BLOCK == 0:
        return (
            gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
            gguf.GGMLQuantizationType.Q8_0,
            "q8_0",
        )
    if type == "bf16":
        return (
            gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16),
            gguf.GGMLQuantizationType.BF16,
            "bf16",
        )
    big = float(np.abs(arr).max()) if arr.size else 0.0
    if big > 65504:
        raise ExportError(
            f"{hf_name} holds a weight of {big:.3g}, beyond float16's range: export with type='bf16'"
        )
    return arr.astype(np.float16), None, "f16"


def write_gguf(merged: Path, path: Path, tokenizer: Any, type: str) -> dict[str, Any]:
    """Write the merged model in ``merged`` to ``path``; returns what was written (tensor counts by type,
    tensors kept in f16 where q8_0 was asked, vocabulary facts)."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(merged)
    hp = _hparams(config)
    arch = gguf.MODEL_ARCH.LLAMA if ARCHITECTURES[config.model_type] == "llama" else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    files = _weight_files(merged)
    tensors: dict[str, tuple[Path, str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            tensors.update({k: (f, k) for k in sf.keys()})
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise ExportError(f"{merged}: no model.embed_tokens.weight in the safetensors")
    with safe_open(str(embed[0]), framework="pt") as sf:
        n_rows = sf.get_slice(embed[1]).get_shape()[0]
    vocab = read_vocab(tokenizer, n_rows)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    _add_metadata(writer, config, hp, vocab, merged.resolve().name, type)
    counts: dict[str, int] = {}
    kept_f16: list[str] = []
    skipped: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key == "lm_head.weight" and tied:
                    skipped.append(key)  # tied: llama.cpp reads the embedding matrix
                    continue
                if key.endswith(("rotary_emb.inv_freq", "masked_bias", ".attn.bias")):
                    skipped.append(key)
                    continue
                gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if gname is None:
                    raise ExportError(f"{merged}: tensor {key!r} has no GGUF name for {config.model_type}")
                data = sf.get_tensor(key)
                if config.model_type in ROPE_PERMUTED and key.endswith("self_attn.q_proj.weight"):
                    data = rope_permute(data, hp["n_head"])
                elif config.model_type in ROPE_PERMUTED and key.endswith("self_attn.k_proj.weight"):
                    data = rope_permute(data, hp["n_kv"])
                arr, raw, kind = _encode(data, type, key)
                if type == "q8_0" and kind == "f16":
                    kept_f16.append(key)
                counts[kind] = counts.get(kind, 0) + 1
                writer.add_tensor(gname, arr, raw_dtype=raw)
    if not tied and "lm_head.weight" not in tensors:
        raise ExportError(f"{merged}: the config says the head is not tied, but there is no lm_head.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "architecture": gguf.MODEL_ARCH_NAMES[arch],
        "model_type": config.model_type,
        "tensors": counts,
        "kept_f16_for_q8_0": kept_f16,
        "skipped": skipped,
        "tied_head": tied,
        "vocab_size": len(vocab.tokens),
        "padded_vocab_rows": vocab.padded_rows,
        "tokenizer_model": vocab.model,
        "pre_tokenizer": vocab.pre,
        "special_ids": vocab.special_ids,
        "add_bos": vocab.add_bos,
        "chat_template": bool(vocab.chat_template),
    }


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------


def _gguf_dir_and_name(path: Path) -> tuple[str, str]:
    return str(path.parent), path.name


def verify_gguf(
    merged: Path, path: Path, tokenizer: Any, texts: Sequence[str], type: str, texts_source: str
) -> dict[str, Any]:
    """Score the merged model and the reloaded GGUF on the same token ids (both in float32) and compare;
    returns the report (``passed`` and every number behind it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    max_len = min(512, int(getattr(merged_model.config, "max_position_embeddings", 512) or 512))
    sequences = eval_sequences(tokenizer, list(texts), EVAL_MAX_TOKENS, max_len)
    if not sequences:
        raise ExportError("the held-out texts are empty after tokenization; give longer eval_texts")
    ref, ref_logits = score(merged_model, sequences, COMPARE_TOKENS)
    del merged_model
    gc.collect()
    directory, name = _gguf_dir_and_name(path)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    got, got_logits = score(reloaded, sequences, COMPARE_TOKENS)
    del reloaded
    gc.collect()
    # transformers' reader drops USER_DEFINED tokens spelled with a space (domain tokens): put them back
    reloaded_tok = with_user_defined(AutoTokenizer.from_pretrained(directory, gguf_file=name), path)
    mismatched = [
        i for i, text in enumerate(texts) if reloaded_tok(text)["input_ids"] != tokenizer(text)["input_ids"]
    ]
    u = ROUNDING[type]
    scale = max(1.0, float(ref_logits.abs().max())) if ref_logits.numel() else 1.0
    logit_bound = LOGIT_FACTOR * u * scale
    loss_bound = LOSS_FACTOR * u
    diff = max_abs_diff(ref_logits, got_logits)
    loss_diff = abs(got.loss - ref.loss)
    problems = []
    if not math.isfinite(diff) or diff > logit_bound:
        problems.append(f"max |logit diff| {diff:.4g} exceeds the {type} bound {logit_bound:.4g}")
    if not math.isfinite(loss_diff) or loss_diff > loss_bound:
        problems.append(f"|loss diff| {loss_diff:.4g} nats exceeds the {type} bound {loss_bound:.4g}")
    if mismatched:
        problems.append(
            f"the GGUF's tokenizer encodes {len(mismatched)} of {len(texts)} held-out texts differently "
            f"(first: text {mismatched[0]})"
        )
    return {
        "type": type,
        "eval_texts": texts_source,
        "tokens": ref.tokens,
        "merged": {"loss": ref.loss, "ppl": ref.perplexity},
        "gguf": {"loss": got.loss, "ppl": got.perplexity},
        "max_abs_logit_diff": diff,
        "loss_diff": loss_diff,
        "compared_positions": int(ref_logits.shape[0]) if ref_logits.numel() else 0,
        "bound": {
            "rounding_u": u,
            "logit": logit_bound,
            "loss": loss_bound,
            "rule": f"max|dlogit| <= {LOGIT_FACTOR:g}*u*max(1, max|logit|); |dloss| <= {LOSS_FACTOR:g}*u",
        },
        "tokenizer_mismatches": len(mismatched),
        "problems": problems,
        "passed": not problems,
    }


# ---------------------------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------------------------

_CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    "{{ .Response }}<|im_end|>\n"
)
_LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)


def modelfile_text(gguf_name: str, tokenizer: Any) -> str:
    """An Ollama Modelfile for ``gguf_name`` beside it: FROM, a TEMPLATE when the chat template is ChatML or
    Llama 3's (else a comment saying to write one), and a stop PARAMETER for each end-of-turn token."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    vocab = tokenizer.get_vocab()
    lines = [
        f"# Ollama: ollama create NAME -f {gguf_name.removesuffix('.gguf')}.Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if template and "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{_CHATML}"""')
    elif template and "<|start_header_id|>" in template:
        lines.append(f'TEMPLATE """{_LLAMA3}"""')
    elif template:
        lines.append(
            "# The chat template is not ChatML or Llama 3's: write a TEMPLATE for it (Go template syntax);"
        )
        lines.append("# the GGUF holds it as tokenizer.chat_template for llama.cpp and LM Studio.")
    else:
        lines.append("# No chat template: a base (completion) model; Ollama sends the prompt as it is.")
    stops = [t for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>") if t in vocab]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def export_gguf(
    source: str | Path,
    output: str | Path | None = None,
    *,
    type: str = "f16",
    eval_texts: Sequence[str] | None = None,
    overwrite: bool = False,
) -> GGUFExport:
    """Write a merged model as a verified GGUF file (+ an Ollama Modelfile and an export report).

    Args:
        source: a merged model directory (a transformers checkpoint with safetensors, e.g. ``RUN/merged``)
            or a run directory (its ``merged/`` is used; ExportError saying to run ``lora-dapt merge RUN``
            when it has none).
        output: the .gguf path; default ``RUN/<run name>-<type>.gguf`` for a run, else
            ``<merged dir>-<type>.gguf`` beside the merged directory.
        type: ``"f16"``, ``"bf16"`` or ``"q8_0"``.
        eval_texts: held-out texts for the check; default the run's eval split (``eval_texts.json``) when
            the source is a run, else a few generic sentences (the report says which).
        overwrite: replace an existing file at ``output``.

    Raises ExportError for an unsupported architecture or tokenizer, an existing output, or a file that does
    not verify (it is then left at ``<path>.partial``, with the report beside it).

    Example::

        export_gguf("runs/demo", type="q8_0").path   # -> Path("runs/demo/demo-q8_0.gguf")
    """
    from transformers import AutoTokenizer

    if type not in TYPES:
        raise ExportError(f"GGUF type {type!r} is not supported; choose one of {', '.join(TYPES)}")
    merged, run = resolve_source(source)
    path = Path(output).expanduser() if output is not None else default_output(merged, run, type)
    if path.suffix != ".gguf":
        raise ExportError(f"output {path} must end in .gguf")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists: pass overwrite=True (--overwrite) to replace it")
    texts, note = (list(eval_texts), "given texts") if eval_texts else (None, "")
    if texts is None and run is not None:
        kept = run.read_eval_texts()
        if kept:
            texts, note = kept, f"the run's eval split ({run.eval_texts_path.name})"
    if not texts:
        texts, note = list(FALLBACK_TEXTS), "built-in generic sentences (no held-out texts given)"
        log.warning("GGUF check uses generic sentences: pass eval_texts for domain numbers")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    log.info("writing %s (%s) from %s", path, type, merged)
    written = write_gguf(merged, partial, tokenizer, type)
    report = verify_gguf(merged, partial, tokenizer, texts, type, note)
    report = {"source": str(merged), "file": str(path), **report, "written": written}
    report["size_bytes"] = partial.stat().st_size
    report_path = path.with_name(path.name + ".export_report.json")
    write_json_atomic(report_path, report)
    if not report["passed"]:
        raise ExportError(
            f"the GGUF file did not verify ({'; '.join(report['problems'])}); it is left at {partial}, the "
            f"numbers in {report_path}"
        )
    os.replace(partial, path)
    modelfile = path.with_suffix(".Modelfile")
    modelfile.write_text(modelfile_text(path.name, tokenizer), encoding="utf-8")
    log.info(
        "GGUF verified: ppl %.4f (merged %.4f), max |logit diff| %.3g <= %.3g",
        report["gguf"]["ppl"],
        report["merged"]["ppl"],
        report["max_abs_logit_diff"],
        report["bound"]["logit"],
    )
    return GGUFExport(
        path=path, type=type, size_bytes=report["size_bytes"], modelfile=modelfile, report=report
    )


def format_export(result: GGUFExport) -> str:
    """The report as a few printed lines (what ``lora-dapt export`` shows)."""
    r = result.report
    return "\n".join(
        [
            f"GGUF written: {result.path} ({result.type}, {result.size_bytes / 2**20:.1f} MiB)",
            f"Ollama Modelfile: {result.modelfile}",
            f"held-out ({r['eval_texts']}, {r['tokens']} tokens): merged ppl {r['merged']['ppl']:.4f}, "
            f"GGUF ppl {r['gguf']['ppl']:.4f}",
            f"max |logit diff| {r['max_abs_logit_diff']:.3g} (bound {r['bound']['logit']:.3g}), "
            f"|loss diff| {r['loss_diff']:.3g} (bound {r['bound']['loss']:.3g}): "
            f"{'passed' if r['passed'] else 'FAILED'}",
        ]
    )
