"""GGUF import: a GGUF checkpoint becomes an ordinary safetensors directory that bitsandbytes can quantize.

transformers can read GGUF files but refuses to combine them with bitsandbytes quantization. We dequantize
the GGUF once into a safetensors checkpoint in a cache directory (keyed by the file's path, size and mtime),
drop the GGUF ``quantization_config``, and load that checkpoint like any other directory. The same cache
serves the 16-bit reload at merge time. The trade-off is disk: the copy is float32 for small models and
bfloat16 above 2B parameters, several times the size of the GGUF file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..progress import foreign_bars_hidden
from .aliases import bundled_gguf
from .tokenizer import load_tokenizer

log = logging.getLogger("lora_dapt")

KEEP_FLOAT32_UP_TO = 2_000_000_000
"""Models up to this many parameters keep the exact dequantized float32 values; larger ones are bfloat16."""


def cache_root() -> Path:
    """lora_dapt's cache directory: ``$LORA_DAPT_CACHE``, default ``~/.cache/lora_dapt``."""
    return Path(os.environ.get("LORA_DAPT_CACHE", Path.home() / ".cache" / "lora_dapt"))


def find_gguf(name_or_path: str | Path, gguf_file: str | None = None) -> tuple[Path, str] | None:
    """(directory, file name) of the GGUF checkpoint that ``name_or_path`` and ``gguf_file`` name, or None.

    A path to a ``.gguf`` file, or a directory without config.json that holds exactly one, needs no
    ``gguf_file``; a directory holding several is an error that lists them. An alias of a bundled model
    (``smollm2-135m``, :mod:`lora_dapt.model.aliases`) is its package's file. Example:
    ``find_gguf("models/q4.gguf") == (Path("models"), "q4.gguf")``.
    """
    bundled = bundled_gguf(name_or_path, gguf_file)
    if bundled is not None:
        return bundled
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if gguf_file:
        return p, gguf_file
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        if ggufs:
            raise ModelLoadError(
                f"{p} holds several GGUF files ({', '.join(g.name for g in ggufs)}); choose one with gguf_file="
            )
    return None


def gguf_to_checkpoint(directory: str | Path, gguf_file: str, *, cache_dir: str | Path | None = None) -> Path:
    """Dequantize ``directory/gguf_file`` once into a safetensors checkpoint; return its directory.

    The checkpoint (config without the GGUF quantization_config, weights, tokenizer) is cached under
    ``$LORA_DAPT_CACHE`` (default ``~/.cache/lora_dapt``) keyed by the file's path, size and mtime, so later
    loads (and the 16-bit reload at merge time) skip the dequantization. It is written to a temporary
    directory and renamed when complete, so an interrupted conversion is redone, never half-used.
    """
    from transformers import AutoModelForCausalLM

    src = Path(directory) / gguf_file
    if not src.is_file():
        raise ModelLoadError(f"GGUF file not found: {src} (check model.name_or_path and model.gguf_file)")
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cache_dir or cache_root() / "gguf") / f"{src.stem}-{key}"
    if (out / ".complete").is_file():
        return out
    log.info("dequantizing GGUF %s into %s (once; cached)", src, out)
    try:
        # transformers' dequantization bar has no switch: off a terminal its redraws are dropped
        with foreign_bars_hidden():
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), gguf_file=gguf_file, dtype=torch.float32
            )
    except (OSError, ValueError, ImportError, struct.error, EOFError, KeyError, IndexError) as e:
        # a truncated or garbled file fails inside the gguf reader (struct.error, IndexError, KeyError)
        raise ModelLoadError(
            f"cannot read GGUF file {src} ({src.stat().st_size:,} bytes; truncated or not a GGUF file?): "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from None
    if sum(p.numel() for p in model.parameters()) > KEEP_FLOAT32_UP_TO:
        model = model.to(torch.bfloat16)  # halves the disk
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
        shutil.rmtree(out)
    tmp.rename(out)
    return out
