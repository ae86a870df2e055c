"""Loading the base model: 4-bit, 8-bit or 16-bit, from a local directory, a GGUF file or a hub id.

:func:`load_base_model` returns the model, its tokenizer (with a pad token, :func:`fix_tokenizer`) and a
:class:`ModelSource`: a typed record of where the model came from, which the run directory stores and from
which merge, SFT and ``lora-dapt eval`` load the same base again. This module resolves the device, the
compute dtype (:data:`DTYPES`, the one table of dtype names) and the model path; quantization is
:mod:`~lora_dapt.model.bnb`'s, the GGUF import :mod:`~lora_dapt.model.gguf`'s and the attention kernel
:mod:`~lora_dapt.model.attention`'s. ``gguf_to_checkpoint``, ``fix_tokenizer`` and ``load_tokenizer`` are
importable from here too.

By default the model gets :func:`~lora_dapt.model.attention.packed_sdpa_attention` (or flash-attention's
varlen kernel on CUDA), so packed documents never attend to each other; ``attn_implementation`` overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError, ModelLoadError
from .aliases import ALIASES
from .attention import pick_attention, use_packed_sdpa
from .bnb import describe_quantization, keep_4bit_trainable, quantization_config
from .gguf import find_gguf, gguf_to_checkpoint
from .lora import base_model
from .tokenizer import fix_tokenizer, load_raw_tokenizer, load_tokenizer

__all__ = [
    "DTYPES",
    "LoadedModel",
    "ModelSource",
    "check_seq_len",
    "context_length",
    "fix_tokenizer",
    "gguf_to_checkpoint",
    "load_base_model",
    "load_base_model_from",
    "load_tokenizer",
    "resolve_compute_dtype",
    "resolve_device",
    "resolve_model_source",
    "tokenizer_before_load",
]

log = logging.getLogger("lora_dapt")


DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
"""The compute / merge dtypes lora_dapt accepts, by the name configs use."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> this process's GPU when available (cuda:LOCAL_RANK: cuda:0 without a launcher, one GPU per
    rank under torchrun), else cpu. Explicit 'cuda' without CUDA is an error."""
    if device == "auto":
        from ..train.distributed import local_rank

        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {device!r}: CUDA is not available here; use 'auto' or 'cpu'")
    return dev


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose bfloat16 matmuls run natively (AVX512-BF16 or AMX): there bf16 is several times
    faster than fp32 (2048x2048 matmuls on a 2-core Xeon: 660 vs 214 GFLOP/s); elsewhere it is emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_compute_dtype(
    compute_dtype: str | torch.dtype = "auto", device: torch.device | None = None
) -> torch.dtype:
    """'auto': bfloat16 where the device computes it natively (CUDA cards from Ampere on, CPUs with
    AVX512-BF16 or AMX), float16 on older CUDA cards, float32 on other CPUs (where bf16 is emulated and
    slower than fp32). bitsandbytes' CPU 4-bit kernels accept both.
    """
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    if compute_dtype != "auto":
        if compute_dtype not in DTYPES:
            raise ConfigError(
                f"compute_dtype = {compute_dtype!r}: use 'auto', 'bfloat16', 'float16' or 'float32'"
            )
        return DTYPES[compute_dtype]
    device = device or resolve_device("auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def is_hub_id(text: str) -> bool:
    """Looks like a hub id ('org/name'): one slash, not a relative or absolute path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and "\\" not in text


def resolve_model_source(name_or_path: str | Path, gguf_file: str | None = None) -> Path | str:
    """Turn (path, gguf_file) into something ``from_pretrained`` can quantize: a directory or a hub id.

    A path to a ``.gguf`` file, or a directory holding exactly one, is accepted without ``gguf_file``; GGUF
    checkpoints come back as their dequantized copy (:func:`gguf_to_checkpoint`). Anything that is neither
    a model directory nor shaped like a hub id (``org/name``) is a :class:`ModelLoadError` that says which.
    """
    found = find_gguf(name_or_path, gguf_file)
    if found is not None:
        return gguf_to_checkpoint(*found)
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{p} is a directory but has no config.json or .gguf file: not a model directory"
            )
        _refuse_pickle_weights(p)
        return p
    text = str(name_or_path)
    if not is_hub_id(text):
        raise ModelLoadError(
            f"model not found: {text} is not a local directory or file. Give the path of a directory "
            "with config.json and weights, a .gguf file, a hub id like 'org/name' (needs network), or the "
            f"alias of a bundled model ({', '.join(ALIASES)})."
        )
    return str(name_or_path)


def _refuse_pickle_weights(directory: Path) -> None:
    """A model directory whose weights are only pickle files (``pytorch_model*.bin``, ``*.pt``) is refused:
    loading them unpickles a stranger's file, which can run any code. safetensors files cannot."""
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(
        f.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in directory.glob(pattern)
    )
    if pickles:
        raise ModelLoadError(
            f"{directory} holds its weights only as pickle files ({', '.join(pickles[:3])}): lora_dapt does not "
            "load them, since unpickling a file can run any code in it. Convert the weights to safetensors "
            "where you trust them (model.save_pretrained(dir, safe_serialization=True)), or use a "
            "directory with model.safetensors"
        )


def context_length(config: Any) -> int | None:
    """The longest sequence a model's config says it was trained for (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None when it does not say."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seq_len(config: Any, seq_len: int, key: str = "data.seq_len", where: str = "the model") -> None:
    """Refuse blocks longer than the model's context (``max_position_embeddings``): positions past it were
    never trained (and rotary or learned position tables do not extrapolate reliably).

    Called where corpus and model meet: :func:`lora_dapt.run` before the corpus is prepared (the model's
    config.json is all it needs), and ``continued_pretrain`` for blocks prepared elsewhere.
    """
    limit = context_length(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"{key} = {seq_len:,}: longer than the context of {where} (max_position_embeddings = {limit:,}); "
            f"set {key} to at most {limit:,}"
        )


def tokenizer_before_load(config: ModelConfig, seq_len: int | None = None, key: str = "data.seq_len") -> Any:
    """The tokenizer of ``config``'s model, read before (and without) loading any weights: from a GGUF
    file itself, not its dequantized copy. With ``seq_len``, also :func:`check_seq_len` against the model's
    config, so that a run fails on its inputs before the slow model load.
    """
    found = find_gguf(config.name_or_path, config.gguf_file)
    source: str | Path = found[0] if found else resolve_model_source(config.name_or_path)
    kwargs: dict[str, Any] = {"gguf_file": found[1]} if found else {}
    if seq_len is not None:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(
                str(source), trust_remote_code=config.trust_remote_code, **kwargs
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read the model config of {source!s}: {e}") from None
        check_seq_len(model_config, seq_len, key, config.name_or_path)
    return load_tokenizer(source, trust_remote_code=config.trust_remote_code, **kwargs)


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded base model came from and how it was loaded: what ``run_info.json`` records, and what
    merge, SFT and ``lora-dapt eval`` load again."""

    name_or_path: str
    """The model as the user named it (a directory, a .gguf file, a hub id)."""
    gguf_file: str | None = None
    """The GGUF file inside ``name_or_path`` when the user named one."""
    resolved: str | None = None
    """What ``from_pretrained`` loaded: the directory (for a GGUF, lora_dapt's dequantized copy) or hub id."""
    quantization: str = "none"
    """'nf4', 'fp4', 'int8' or 'none'."""
    compute_dtype: str = "float32"
    """The resolved compute dtype ('bfloat16', 'float16', 'float32')."""
    pad_token: str | None = None
    """Where the tokenizer's pad token came from (:func:`fix_tokenizer`)."""

    @property
    def quantized(self) -> bool:
        """Whether the base was loaded with bitsandbytes quantization."""
        return self.quantization not in (None, "none")

    def loadable(self) -> tuple[str, str | None]:
        """(path or id, gguf_file) to load this base again: the name the user gave, or its resolved copy when
        the original has moved away (the dequantized GGUF checkpoint is still in the cache, say)."""
        if self.resolved and Path(self.resolved).is_dir() and not Path(self.name_or_path).exists():
            return self.resolved, None
        return self.name_or_path, self.gguf_file

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (what ``run_info.json`` stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        """From :meth:`to_dict` (keys it does not know, from other versions, are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def of_model(cls, model: Any) -> ModelSource:
        """A best guess for a model that :func:`load_base_model` did not load: its config's name, its
        bitsandbytes quantization, its dtype."""
        base = base_model(model)
        cfg = getattr(base, "config", None)
        name = str(getattr(cfg, "_name_or_path", "") or type(base).__name__)
        quant, compute = describe_quantization(cfg)
        dtype = str(compute or getattr(base, "dtype", torch.float32)).removeprefix("torch.")
        return cls(name_or_path=name, resolved=name, quantization=quant, compute_dtype=dtype)


@dataclass
class LoadedModel:
    """What :func:`load_base_model` returns. It unpacks (and indexes) as the pair ``model, tokenizer``;
    ``source`` says where the model came from (``continued_pretrain(..., model_source=loaded.source)``
    records it in the run)."""

    model: Any
    tokenizer: Any
    source: ModelSource

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Any:
        return (self.model, self.tokenizer)[index]


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
    quant_storage: str = "uint8",
) -> LoadedModel:
    """Load a causal LM (quantized with bitsandbytes unless ``quantization`` is None/'none') and its tokenizer.

    Args:
        name_or_path: local model directory, a ``.gguf`` file, a directory with one GGUF file, or a hub id.
        quantization: 'nf4' (QLoRA default), 'fp4', 'int8' or None/'none' for 16-bit.
        compute_dtype: 'auto' (bf16 where native: Ampere+ GPUs, CPUs with AVX512-BF16/AMX; fp16 on older
            GPUs; fp32 on other CPUs) or a dtype name.
        double_quant: also quantize the 4-bit quantization constants.
        gguf_file: file name of a GGUF checkpoint inside ``name_or_path``.
        device: 'auto', 'cpu' or 'cuda[:N]'.
        trust_remote_code: run code from the model repository (off by default).
        attn_implementation: force an attention kernel; by default one that isolates packed documents.
        quant_storage: dtype the packed 4-bit weights are stored in ('uint8'; the compute dtype for FSDP).

    Returns:
        a :class:`LoadedModel`: unpack it as ``model, tokenizer`` (the tokenizer has a pad token, see
        :func:`fix_tokenizer`); its ``source`` records where the model came from.

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
    qcfg = quantization_config(quantization, dtype, double_quant=double_quant, quant_storage=quant_storage)
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
    tokenizer = load_raw_tokenizer(source, trust_remote_code=trust_remote_code)
    pad_source = fix_tokenizer(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    record = ModelSource(
        name_or_path=str(name_or_path),
        gguf_file=gguf_file,
        resolved=str(source),
        quantization=quantization or "none",
        compute_dtype=str(dtype).removeprefix("torch."),
        pad_token=pad_source,
    )
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s: %s parameters stored, quantization=%s, compute dtype=%s, device=%s",
        name_or_path,
        f"{n:,}",
        quantization or "none",
        dtype,
        dev,
    )
    return LoadedModel(model, tokenizer, record)


def load_base_model_from(config: ModelConfig, **overrides: Any) -> LoadedModel:
    """:func:`load_base_model` with the settings of a ``model`` config section; ``overrides`` replace single
    arguments (e.g. ``quantization=None`` for a 16-bit load).

    Example::

        loaded = load_base_model_from(run_config.model)
    """
    kwargs: dict[str, Any] = {
        "quantization": None if config.quantization == "none" else config.quantization,
        "compute_dtype": config.compute_dtype,
        "double_quant": config.double_quant,
        "gguf_file": config.gguf_file,
        "device": config.device,
        "trust_remote_code": config.trust_remote_code,
        "attn_implementation": config.attn_implementation,
        "quant_storage": config.quant_storage,
    }
    kwargs.update(overrides)
    name = kwargs.pop("name_or_path", config.name_or_path)
    return load_base_model(name, **kwargs)
