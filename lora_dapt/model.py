"""Loading the base model (4-bit, 8-bit or 16-bit; local directories and GGUF files) and attaching LoRA.

This is the only module that imports bitsandbytes, and it does so lazily.

GGUF files: transformers can read them but refuses to combine them with bitsandbytes quantization. We
dequantize the GGUF once into a safetensors checkpoint in a cache directory (keyed by the file's path, size
and mtime), drop the GGUF ``quantization_config``, and load that checkpoint like any other directory. The
same cache serves the 16-bit reload at merge time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch

from .config import AdapterConfig
from .errors import ConfigError, ModelLoadError, TrainingError

log = logging.getLogger("lora_dapt")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda:0 when available, else cpu. Explicit 'cuda' without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {device!r}: CUDA is not available here; use 'auto' or 'cpu'")
    return dev


def resolve_compute_dtype(
    compute_dtype: str | torch.dtype = "auto", device: torch.device | None = None
) -> torch.dtype:
    """'auto': bfloat16 on CUDA cards that support it, float16 on older cards, float32 on CPU.

    On the CPU float32 is the fastest choice on most machines (bf16 matmuls are emulated without AVX512-BF16
    or AMX), and bitsandbytes' CPU 4-bit kernels accept it.
    """
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    if compute_dtype != "auto":
        if compute_dtype not in _DTYPES:
            raise ConfigError(
                f"compute_dtype = {compute_dtype!r}: use 'auto', 'bfloat16', 'float16' or 'float32'"
            )
        return _DTYPES[compute_dtype]
    device = device or resolve_device("auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def fix_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token without making EOS unlearnable.

    Preference: an existing pad token; else a dedicated special token the vocabulary already has (``<pad>``,
    ``<|pad|>``, ``<|finetune_right_pad_id|>``, the unk token) so that pad != eos; else eos itself. Using eos as
    pad is safe here because lora_dapt builds labels from positions, never by masking every pad-token id (the
    bug that stops models from learning to end, trl #1623). The choice is recorded on the tokenizer as
    ``lora_dapt_pad_source``.
    """
    if tokenizer.pad_token_id is not None:
        tokenizer.lora_dapt_pad_source = "tokenizer"
        return tokenizer
    vocab = tokenizer.get_vocab()
    for cand in ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|finetune_right_pad|>"):
        if cand in vocab and vocab[cand] != tokenizer.eos_token_id:
            tokenizer.pad_token = cand
            tokenizer.lora_dapt_pad_source = cand
            return tokenizer
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        tokenizer.lora_dapt_pad_source = "unk"
        return tokenizer
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            "the tokenizer has neither a pad, unk nor eos token; add one, e.g. "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings"
        )
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.lora_dapt_pad_source = "eos"
    return tokenizer


def load_tokenizer(
    name_or_path: str | Path, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {name_or_path!s}: {e}") from None
    return fix_tokenizer(tok)


# ---------------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    return Path(os.environ.get("LORA_DAPT_CACHE", Path.home() / ".cache" / "lora_dapt"))


def gguf_to_checkpoint(directory: str | Path, gguf_file: str, *, cache_dir: str | Path | None = None) -> Path:
    """Dequantize ``directory/gguf_file`` once into a safetensors checkpoint; return its directory.

    The checkpoint (config without the GGUF quantization_config, weights, tokenizer) is cached under
    ``$LORA_DAPT_CACHE`` (default ``~/.cache/lora_dapt``) keyed by the file's path, size and mtime, so later
    loads (and the 16-bit reload at merge time) skip the dequantization.
    """
    from transformers import AutoModelForCausalLM

    src = Path(directory) / gguf_file
    if not src.is_file():
        raise ModelLoadError(f"GGUF file not found: {src} (check model.name_or_path and model.gguf_file)")
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cache_dir or _cache_root() / "gguf") / f"{src.stem}-{key}"
    if (out / ".complete").is_file():
        return out
    log.info("dequantizing GGUF %s into %s (once; cached)", src, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"cannot read GGUF file {src}: {e}") from None
    # Small models are kept in float32 (exact dequantized values); large ones in bfloat16 to halve the disk.
    n = sum(p.numel() for p in model.parameters())
    if n > 2_000_000_000:
        model = model.to(torch.bfloat16)
    # The weights are plain tensors now; drop the GGUF "quantization" so the checkpoint saves and loads as an
    # ordinary 16/32-bit model that bitsandbytes can quantize (an instance attribute, not a class patch).
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    load_tokenizer(directory, gguf_file=gguf_file).save_pretrained(tmp)
    (tmp / ".complete").write_text(str(src), encoding="utf-8")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_model_source(name_or_path: str | Path, gguf_file: str | None = None) -> Path | str:
    """Turn (path, gguf_file) into something ``from_pretrained`` can quantize: a directory or a hub id.

    A path to a ``.gguf`` file, or a directory holding exactly one, is accepted without ``gguf_file``.
    """
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".gguf":
        return gguf_to_checkpoint(p.parent, p.name)
    if gguf_file:
        return gguf_to_checkpoint(p, gguf_file)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return gguf_to_checkpoint(p, ggufs[0].name)
            if ggufs:
                raise ModelLoadError(
                    f"{p} holds several GGUF files ({', '.join(g.name for g in ggufs)}); choose one with gguf_file="
                )
            raise ModelLoadError(
                f"{p} is a directory but has no config.json or .gguf file: not a model directory"
            )
        return p
    text = str(name_or_path)
    is_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and "\\" not in text
    if not is_hub_id:
        raise ModelLoadError(
            f"model not found: {text} is not a local directory or file. Give the path of a directory "
            "with config.json and weights, a .gguf file, or a hub id like 'org/name' (needs network)."
        )
    return str(name_or_path)


# ---------------------------------------------------------------------------------------------------------------
# Base model
# ---------------------------------------------------------------------------------------------------------------


def quantization_config(
    quantization: str | None, compute_dtype: torch.dtype, *, double_quant: bool = True
) -> Any | None:
    """A transformers ``BitsAndBytesConfig`` for 'nf4' | 'fp4' | 'int8', or None for 16-bit."""
    if quantization in (None, "none"):
        return None
    if quantization not in ("nf4", "fp4", "int8"):
        raise ConfigError(f"quantization = {quantization!r}: use 'nf4', 'fp4', 'int8' or None")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes (or use quantization=None)"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=torch.uint8,
    )


PACKED_SDPA = "lora_dapt_sdpa"
"""Name under which :func:`packed_sdpa_attention` is registered with transformers' ``AttentionInterface``."""

_SPAN_CACHE: list[tuple[Any, Any, list[list[tuple[int, int]]] | None]] = []


def _packed_spans(
    mask: torch.Tensor | None, position_ids: torch.Tensor, batch: int, length: int
) -> list[list[tuple[int, int]]] | None:
    """Per row, the ``[start, end)`` spans of the packed documents (a new document wherever the position does
    not go up by one), or None when there is nothing to split or ``mask`` is not exactly the block-causal
    mask those spans imply (a padding mask, a sliding window, ...).

    ``mask`` None means transformers found plain causal attention enough: it skips packing detection when the
    model runs with a KV cache (``use_cache=True``), so then the documents are split here, as
    flash-attention's varlen path does. transformers builds one mask per forward and hands the same tensor
    to every layer (and to the recomputed layers of gradient checkpointing), so the answer is cached per
    (mask, position_ids) pair of live tensors.
    """
    for mask_ref, pos_ref, spans in _SPAN_CACHE:
        if (mask_ref() if mask_ref is not None else None) is mask and pos_ref() is position_ids:
            return spans
    spans = None
    with torch.no_grad():
        pos = position_ids.expand(batch, -1)
        new_doc = pos[:, 1:] - pos[:, :-1] != 1
        if mask is None:
            ok = bool(new_doc.any())
        elif (
            mask.dtype == torch.bool
            and mask.dim() == 4
            and mask.shape[1] == 1
            and mask.shape[-2:] == (length,) * 2
        ):
            seg = torch.cat([torch.zeros_like(pos[:, :1]), new_doc.long().cumsum(-1)], dim=1)
            causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
            block_causal = (seg[:, None, :, None] == seg[:, None, None, :]) & causal
            ok = torch.equal(mask.expand(batch, 1, length, length), block_causal)
        else:
            ok = False
        if ok:
            spans = []
            for starts in (torch.nonzero(row).flatten() + 1 for row in new_doc.cpu()):
                edges = [0, *starts.tolist(), length]
                spans.append(list(itertools.pairwise(edges)))
    mask_ref = weakref.ref(mask) if mask is not None else None
    _SPAN_CACHE.insert(0, (mask_ref, weakref.ref(position_ids), spans))
    del _SPAN_CACHE[4:]
    return spans


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA that runs a packed block one document at a time, each with the plain causal kernel.

    transformers' own SDPA path isolates packed documents with a block-diagonal boolean mask, which sends
    PyTorch to a masked kernel (and repeats grouped key/value heads); on the CPU that made a packed step
    ~10% slower than an unpacked one. Here each document of each row is attended with ``is_causal=True``
    and no mask, so the work is the sum of the squared document lengths instead of the squared block
    length, and the result is the same (tested against the masked path, forward and backward).

    Anything that is not exactly a block-causal packing mask (padding masks, sliding windows, bidirectional
    image spans, a KV cache, decoding) goes to transformers' ``sdpa_attention_forward`` unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (
        position_ids is not None
        and position_ids.shape[-1] == q_len
        and causal
        and q_len > 1
        and key.shape[2] == q_len
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    ):
        spans = _packed_spans(attention_mask, position_ids, query.shape[0], q_len)
        if spans is not None:
            # Documents are cut out of token-major views with one split per tensor: its backward is a single
            # concatenation, where slicing each document out would zero-fill a full-size gradient per document.
            lengths = [e - s for row in spans for s, e in row]
            parts = [
                torch.split(t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]), lengths)
                for t in (query, key, value)
            ]
            out = [
                sdpa_attention_forward(
                    module,
                    q.transpose(0, 1).unsqueeze(0),
                    k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0),
                    None,
                    dropout=dropout,
                    scaling=scaling,
                    is_causal=True,
                )[0]
                for q, k, v in zip(*parts, strict=True)
            ]
            joined = out[0] if len(out) == 1 else torch.cat(out, dim=1)  # [1, batch * seq, heads, head_dim]
            return joined.reshape(query.shape[0], q_len, *joined.shape[2:]), None
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def register_packed_sdpa() -> str:
    """Register :func:`packed_sdpa_attention` (and transformers' SDPA mask builder) as ``PACKED_SDPA``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def use_packed_sdpa(model: Any) -> bool:
    """Switch a model that runs transformers' ``sdpa`` to :func:`packed_sdpa_attention`; True when switched.

    Models on other kernels (flash-attention varlen, eager, a user's choice) are left alone.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(
        model, "set_attn_implementation"
    ):
        return False
    register_packed_sdpa()
    try:
        model.set_attn_implementation(PACKED_SDPA)
    except (ValueError, ImportError) as e:  # pragma: no cover - a model class that cannot switch
        log.debug("keeping sdpa attention: %s", e)
        return False
    return model.config._attn_implementation == PACKED_SDPA


def pick_attention(model_config: Any, requested: str | None, device: torch.device) -> str:
    """An attention implementation that keeps packed documents apart (driven by position_ids).

    flash_attention_2 (varlen) on CUDA when installed; otherwise sdpa, whose mask transformers builds from
    position_ids when no attention_mask is passed (:func:`load_base_model` then switches it to
    :func:`packed_sdpa_attention`, which runs each packed document with the unmasked causal kernel).
    """
    if requested:
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_base_model(
    name_or_path: str | Path,
    quantization: str | None = "nf4",
    compute_dtype: str | torch.dtype = "auto",
    double_quant: bool = True,
    gguf_file: str | None = None,
    *,
    device: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM (quantized with bitsandbytes unless ``quantization`` is None/'none') and its tokenizer.

    Args:
        name_or_path: local model directory, a ``.gguf`` file, a directory with one GGUF file, or a hub id.
        quantization: 'nf4' (QLoRA default), 'fp4', 'int8' or None/'none' for 16-bit.
        compute_dtype: 'auto' (bf16 where supported, fp16 on older GPUs, fp32 on CPU) or a dtype name.
        double_quant: also quantize the 4-bit quantization constants.
        gguf_file: file name of a GGUF checkpoint inside ``name_or_path``.
        device: 'auto', 'cpu' or 'cuda[:N]'.
        trust_remote_code: run code from the model repository (off by default).
        attn_implementation: force an attention kernel; by default one that isolates packed documents.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (see :func:`fix_tokenizer`).

    Example::

        model, tok = load_base_model("models/llama-3-8b", quantization="nf4")
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    source = resolve_model_source(name_or_path, gguf_file)
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config of {source!s}: {e}") from None
    if getattr(config, "quantization_config", None) is not None and quantization not in (None, "none"):
        raise ModelLoadError(
            f"{source!s} is already quantized ({config.quantization_config}); load its 16-bit original, "
            "or pass quantization=None"
        )
    qcfg = quantization_config(quantization, dtype, double_quant=double_quant)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": pick_attention(config, attn_implementation, dev),
        "use_safetensors": None,
    }
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the model from {source!s}: {e}") from None
    if not attn_implementation:
        use_packed_sdpa(model)
    if qcfg is None:
        model.to(dev)
    elif dev.type == "cpu":
        keep_4bit_trainable(model)  # before any forward, so no layer is ever repacked (see its docstring)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Remember where the model came from (used by the run directory and merge).
    model.lora_dapt_source = {
        "name_or_path": str(name_or_path),
        "gguf_file": gguf_file,
        "resolved": str(source),
        "quantization": quantization or "none",
        "compute_dtype": str(dtype).removeprefix("torch."),
    }
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s: %s parameters stored, quantization=%s, compute dtype=%s, device=%s",
        name_or_path,
        f"{n:,}",
        quantization or "none",
        dtype,
        dev,
    )
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------


def linear_module_names(model: Any) -> list[str]:
    """Distinct leaf names of the linear layers (the names LoRA can target), output head excluded."""
    out_emb = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is out_emb:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _module_name(model: Any, target: torch.nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name.rsplit(".", 1)[-1]
    return None


def tied_embeddings(model: Any) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and inp.weight.data_ptr() == out.weight.data_ptr()


def keep_4bit_trainable(model: Any) -> int:
    """Keep bitsandbytes 4-bit layers on the CPU in a layout that gradients flow through.

    bitsandbytes (0.49+) on CPUs with AVX512-BF16 repacks a Linear4bit's weight into an inference-only layout
    on its first eval-mode, no-grad forward (an evaluation, a generate()). The kernel it uses from then on
    has no backward, so after any evaluation the gradient stops at every frozen 4-bit layer and LoRA trains
    on silently wrong gradients (measured on the tiny test model: the first layer's LoRA gradient was off by
    more than its own size). We switch that repacking off per layer (an instance setting of Linear4bit);
    inference on the CPU is then a little slower. :func:`load_base_model` does this before the first forward.
    A layer repacked already cannot be restored exactly (bitsandbytes' inverse rounds the scales and the
    gradients stay visibly off), so a model in that state is refused with the fix.

    Returns the number of layers switched.
    """
    switched = repacked = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit":
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
        state = getattr(module.weight, "quant_state", None)
        repacked += bool(state is not None and getattr(state, "packing_format_for_cpu", False))
    if repacked:
        raise TrainingError(
            f"{repacked} 4-bit layers of this model were repacked by bitsandbytes for CPU inference (it was "
            "evaluated or generated from before training), and that layout passes no gradient. Load the model "
            "again with lora_dapt.load_base_model, which prevents the repacking, then evaluate and train it."
        )
    return switched


def prepare_for_training(model: Any, *, gradient_checkpointing: bool = True) -> Any:
    """Get a (quantized or 16-bit) base model ready for an adapter to train on it; returns the model.

    What peft's ``prepare_model_for_kbit_training`` does (freeze the base; with non-reentrant checkpointing
    the inputs need no grad hook) MINUS its upcast of every 16-bit parameter to fp32: for Llama-3-8B that
    upcast alone adds 4.2 GB (embeddings and head) to a 5.5 GB QLoRA model, and frozen bf16 weights are what
    every other stack trains against. Also keeps 4-bit layers trainable on the CPU (:func:`keep_4bit_trainable`)
    and turns the KV cache off: packed blocks keep documents apart through position_ids, which transformers
    honours only without a cache (generation turns it back on per call).
    """
    keep_4bit_trainable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        # non-reentrant checkpointing reaches the parameters inside without the embedding output requiring
        # grad (peft's enable_input_require_grads would add a backward pass through layer 0's inputs)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.config.use_cache = False
    return model


class CPUDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask is drawn faster on the CPU; the same distribution and scaling.

    PyTorch's CPU dropout draws its Bernoulli mask with the Mersenne Twister, one number per element: with
    LoRA dropout on all-linear targets that was about a fifth of a SmolLM2 training step on two cores. Here
    the mask comes from NumPy's PCG64 (32 random bits per element; an element is kept with probability
    ``1 - p`` to within 2**-32), seeded from PyTorch's generator, so ``torch.manual_seed`` still reproduces
    a run. Eval mode, ``p == 0`` and CUDA tensors go to ``nn.Dropout`` unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        import numpy as np

        seed = int(torch.randint(0, 2**62, (1,)).item())
        n = x.numel()
        raw = np.random.PCG64(seed).random_raw((n + 1) // 2)  # uint64: two uniform 32-bit halves each
        bits = torch.from_numpy(raw.view(np.int32)[:n]).view(x.shape)
        threshold = round(self.p * 2**32) - 2**31  # P(bits < threshold) = p
        return torch.where(bits >= threshold, x, 0.0) * (1.0 / (1.0 - self.p))


def use_cpu_dropout(model: Any) -> int:
    """Replace peft's LoRA dropout modules (``lora_dropout``) with :class:`CPUDropout`; returns how many."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                fast = CPUDropout(drop.p)
                fast.train(drop.training)
                drops[name] = fast
                n += 1
    return n


def _trainable_to_fp32(model: Any) -> None:
    """AdamW on 16-bit weights loses small updates: keep every trainable tensor (LoRA, and the embedding/head
    copies of train_embeddings) in fp32. Tied copies share one Parameter, so they stay tied."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def apply_lora(model: Any, config: AdapterConfig | None = None, **overrides: Any) -> Any:
    """Attach a LoRA adapter (peft) to ``model`` and return the ``PeftModel``.

    Prepares quantized models for k-bit training (peft's ``prepare_model_for_kbit_training``), turns on
    gradient checkpointing when asked, and with ``train_embeddings`` trains the input embeddings and the
    output head in full (``modules_to_save``), keeping tied weights tied. Logs trainable / total parameters.

    Example::

        model = apply_lora(model, AdapterConfig(r=64, alpha=128, use_rslora=True))
    """
    from peft import LoraConfig, get_peft_model

    cfg = config or AdapterConfig()
    if overrides:
        cfg = cfg.replace(**overrides)
    if hasattr(model, "peft_config"):
        raise ConfigError(
            "this model already has a LoRA adapter; load the base model again to start a new one"
        )

    available = linear_module_names(model)
    if isinstance(cfg.target_modules, list):
        missing = [t for t in cfg.target_modules if t not in available]
        if missing:
            raise ConfigError(
                f"adapter.target_modules: {', '.join(missing)} not found in {type(model).__name__}; "
                f"its linear layers are: {', '.join(available)} (or use 'all-linear')"
            )

    prepare_for_training(model, gradient_checkpointing=cfg.gradient_checkpointing)

    modules_to_save = None
    tie = False
    if cfg.train_embeddings:
        emb = _module_name(model, model.get_input_embeddings())
        head = _module_name(model, model.get_output_embeddings())
        modules_to_save = [n for n in (emb, head) if n]
        tie = tied_embeddings(model)

    lora_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save,
        ensure_weight_tying=tie,
        init_lora_weights=cfg.init_lora_weights,
    )
    peft_model = get_peft_model(model, lora_cfg)
    _trainable_to_fp32(peft_model)
    trainable, total = count_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%g on %s%s: %s trainable of %s parameters (%.3f%%)",
        cfg.r,
        cfg.alpha,
        cfg.target_modules if isinstance(cfg.target_modules, str) else ",".join(cfg.target_modules),
        " + embeddings/head" if cfg.train_embeddings else "",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return peft_model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted as their logical size."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_adapter(model: Any, adapter_dir: str | Path, *, is_trainable: bool = False) -> Any:
    """Load a saved adapter onto a freshly loaded base model.

    Only safetensors weights are read: an adapter shipped as a pickle (``adapter_model.bin``) is refused,
    because unpickling a stranger's file can run code. An adapter whose shapes do not fit the model is
    refused with both names in the message.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"no adapter found in {adapter_dir} (expected adapter_config.json there)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if any(adapter_dir.glob("*.bin")) or any(adapter_dir.glob("*.pt")):
            raise ModelLoadError(
                f"{adapter_dir} holds its weights as a pickle (.bin/.pt), which can run code when loaded; "
                "lora_dapt loads adapters only from adapter_model.safetensors. Convert it where you trust it: "
                "PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise ModelLoadError(f"no adapter weights in {adapter_dir} (expected adapter_model.safetensors)")
    try:
        trained_for = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    except ValueError as e:
        raise ModelLoadError(f"{adapter_dir}/adapter_config.json is not valid JSON: {e}") from None
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        detail = next(
            (ln.strip() for ln in first if "size mismatch" in ln), first[0] if first else type(e).__name__
        )
        raise ModelLoadError(
            f"the adapter in {adapter_dir} (trained for base {trained_for!r}) does not fit the model "
            f"{getattr(model.config, '_name_or_path', type(model).__name__)!r}: {detail}. Load the base model "
            "the adapter was trained on."
        ) from None
    if is_trainable:
        _trainable_to_fp32(peft_model)
    return peft_model
