"""Checks a merge runs before loading any weights: the adapter's files, its base, shapes, disk space.

Everything here works on files and on a "meta" copy of the base (every shape, no memory), so a mismatched,
corrupted or unsafe adapter, or a full disk, is refused in seconds instead of after minutes of loading.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeError, ModelLoadError

log = logging.getLogger("lora_dapt")

_PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterFiles:
    """A checked adapter directory: what peft loads, and the shapes of its tensors."""

    load_dir: Path
    """What peft loads from: the adapter directory, or a safetensors copy of a ``.bin`` adapter."""
    config: dict[str, Any]
    """``adapter_config.json``."""
    shapes: dict[str, tuple[int, ...]]
    """Parameter name in the base model (peft's prefix removed) -> shape."""
    trained_embeddings: bool
    """The adapter holds fully trained tensors (embeddings / head, peft ``modules_to_save``)."""


def _base_param_name(key: str) -> str:
    return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key


def _check_finite(name: str, tensor: torch.Tensor, adapter_dir: Path) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise MergeError(
            f"the adapter in {adapter_dir} is corrupted: tensor {name} has {n_nan} NaN and {n_inf} inf values; "
            "refusing to merge. Use an earlier checkpoint (training diverged, or the file is damaged)."
        )


def read_adapter(adapter_dir: str | Path, staging_dir: str | Path | None = None) -> AdapterFiles:
    """Read and check a saved peft adapter without loading any model.

    Every tensor must be finite. ``adapter_model.safetensors`` is preferred; a lone ``adapter_model.bin`` is
    read with ``torch.load(weights_only=True)`` (so a pickle cannot run code) and rewritten as safetensors into
    ``staging_dir`` for peft to load.

    Example::

        info = read_adapter("runs/demo/adapter")
        info.shapes["model.layers.0.self_attn.q_proj.lora_A.weight"]   # (16, 4096)
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"no adapter found in {adapter_dir} (expected adapter_config.json there)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MergeError(f"{cfg_path} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise MergeError(
            f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be merged"
        )

    shapes: dict[str, tuple[int, ...]] = {}
    st_path = adapter_dir / "adapter_model.safetensors"
    bin_path = adapter_dir / "adapter_model.bin"
    load_dir = adapter_dir
    if st_path.is_file():
        with safe_open(str(st_path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)  # one tensor at a time
                _check_finite(key, tensor, adapter_dir)
                shapes[_base_param_name(key)] = tuple(tensor.shape)
    elif bin_path.is_file():
        try:
            state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means: refuse the file
            raise MergeError(
                f"refusing to load {bin_path}: it is not a plain tensor file ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Pickle files can run code when loaded; only "
                "weights_only=True loading is allowed. Re-save the adapter with safetensors."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MergeError(f"refusing {bin_path}: expected a dict of tensors, got {type(state).__name__}")
        for key, tensor in state.items():
            _check_finite(key, tensor, adapter_dir)
            shapes[_base_param_name(key)] = tuple(tensor.shape)
        if staging_dir is None:
            raise MergeError(f"{bin_path}: a .bin adapter needs a staging_dir to be converted to safetensors")
        load_dir = Path(staging_dir)
        load_dir.mkdir(parents=True, exist_ok=True)
        # Tied tensors share storage; safetensors wants distinct ones.
        save_file(
            {k: v.detach().contiguous().clone() for k, v in state.items()}, str(load_dir / st_path.name)
        )
        shutil.copy2(cfg_path, load_dir / cfg_path.name)
        del state
    else:
        raise ModelLoadError(f"no adapter weights in {adapter_dir} (expected adapter_model.safetensors)")
    if not shapes:
        raise MergeError(f"the adapter in {adapter_dir} holds no tensors")
    trained_embeddings = any(".lora_" not in k and "lora_magnitude" not in k for k in shapes)
    return AdapterFiles(load_dir, config, shapes, trained_embeddings)


def meta_model(source: str | Path, trust_remote_code: bool) -> tuple[Any, Any]:
    """(config, model with meta tensors): every shape of the base, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config of {source!s}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, model


_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")


def check_base_name(
    adapter: AdapterFiles, adapter_dir: Path, base: str, base_config: Any, aliases: Sequence[str] = ()
) -> list[str]:
    """Compare the adapter's recorded base with the given one. Returns warnings; raises on a different model.

    ``aliases`` are other names of the same base: what ``base`` loads from (for a GGUF, lora_dapt's
    dequantized checkpoint, which older runs recorded), and the source as the user named it in training (a
    ``.gguf`` file's path, which training records). Any name matching counts as the same model.
    """
    recorded = adapter.config.get("base_model_name_or_path")
    if not recorded or str(recorded) in {str(base), *map(str, aliases)}:
        return []
    rec_path = Path(str(recorded))
    if (rec_path / "config.json").is_file():
        try:
            rec = json.loads((rec_path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            rec = {}
        diffs = [
            f"{k}: {rec.get(k)!r} vs {getattr(base_config, k, None)!r}"
            for k in _ARCH_KEYS
            if k in rec and rec.get(k) != getattr(base_config, k, None)
        ]
        if diffs:
            raise MergeError(
                f"base model mismatch: the adapter in {adapter_dir} was trained on {recorded!s} "
                f"(adapter_config.json base_model_name_or_path) but the given base is {base!s}; their configs "
                f"differ ({'; '.join(diffs)}). Pass the base the adapter was trained on."
            )
    msg = (
        f"the adapter in {adapter_dir} records base {recorded!s} but is being merged into {base!s}; "
        "the shapes match, so this is allowed (a moved or copied checkpoint). Make sure it is the same model."
    )
    log.warning(msg)
    return [msg]


def check_shapes(adapter: AdapterFiles, adapter_dir: Path, base: str, meta: Any) -> int | None:
    """Check every adapter tensor against the base's modules. Returns a new vocabulary size when the adapter's
    trained embeddings are larger than the base's (an SFT run that added tokens), else None."""
    recorded = adapter.config.get("base_model_name_or_path") or "an unrecorded base"
    modules = dict(meta.named_modules())
    params = dict(meta.named_parameters(remove_duplicate=False))
    emb_names = {
        n for n, m in modules.items() if m is meta.get_input_embeddings() or m is meta.get_output_embeddings()
    }
    problems: list[str] = []
    new_vocab: int | None = None
    for name, shape in sorted(adapter.shapes.items()):
        if ".lora_" in name:
            mod_name, _, kind = name.partition(".lora_")
            module = modules.get(mod_name)
            if module is None:
                problems.append(
                    f"{mod_name}: the adapter has LoRA weights for it, the base has no such module"
                )
                continue
            in_f = getattr(module, "in_features", getattr(module, "num_embeddings", None))
            out_f = getattr(module, "out_features", getattr(module, "embedding_dim", None))
            if kind.startswith("A.") and len(shape) == 2 and in_f is not None and shape[1] != in_f:
                problems.append(
                    f"{mod_name}: lora_A expects {shape[1]} input features, the base layer has {in_f}"
                )
            if kind.startswith("B.") and len(shape) == 2 and out_f is not None and shape[0] != out_f:
                problems.append(
                    f"{mod_name}: lora_B expects {shape[0]} output features, the base layer has {out_f}"
                )
            continue
        if "lora_magnitude" in name:
            continue
        if ".token_adapter.trainable_tokens_delta" in name:  # trained token rows (adapter.new_tokens)
            mod_name = name.partition(".token_adapter.")[0]
            module = modules.get(mod_name)
            width = getattr(module, "embedding_dim", getattr(module, "in_features", None))
            if module is None or len(shape) != 2 or shape[1] != width:
                problems.append(
                    f"{name}: token rows of shape {list(shape)}, the base's {mod_name} is {module}"
                )
            continue
        # peft saves resized embedding layers whole (save_embedding_layers), wrapper keys included.
        name = name.replace(".modules_to_save.", ".").replace(".original_module.", ".")
        param = params.get(name)
        if param is None:
            problems.append(
                f"{name}: a fully trained tensor in the adapter, but the base has no such parameter"
            )
            continue
        if tuple(param.shape) != shape:
            mod_name = name.rsplit(".", 1)[0]
            grown = mod_name in emb_names and len(shape) == 2 and shape[1:] == tuple(param.shape)[1:]
            if grown and shape[0] > param.shape[0]:
                new_vocab = shape[0]
                continue
            problems.append(f"{name}: shape {list(shape)} in the adapter, {list(param.shape)} in the base")
    if problems:
        shown = "\n  - ".join(problems[:8]) + (
            f"\n  - ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise MergeError(
            f"base model mismatch: the adapter in {adapter_dir} was trained on {recorded!s}, which does not "
            f"match the given base {base!s} ({type(meta).__name__}):\n  - {shown}\n"
            "Pass the base model the adapter was trained on."
        )
    return new_vocab


def count_weights(meta: Any, new_vocab: int | None) -> int:
    """Weights the merged model saves (tied parameters once, as they are saved once; grown embeddings and
    head included); times the bytes per weight of the dtype, its size on disk."""
    seen: set[int] = set()
    n = 0
    for p in meta.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    if new_vocab:
        emb = meta.get_input_embeddings().weight
        n += (new_vocab - emb.shape[0]) * emb.shape[1] * 2
    return n


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing ancestor)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk_space(out: Path, need: int, dtype: str) -> None:
    """MergeError unless the file system of ``out`` has room for ``need`` bytes, with a 5% + 64 MiB margin
    (tokenizer, config, safetensors headers)."""
    free = free_bytes(out.parent)
    if free < need * 1.05 + 64 * 2**20:
        raise MergeError(
            f"not enough disk space for the merged model in {out.parent}: about {need / 2**30:.2f} GiB "
            f"needed ({dtype}), {free / 2**30:.2f} GiB free. Free some space or choose another output_dir."
        )


def check_tokenizer(tokenizer: Any, new_vocab: int | None, base: str, base_vocab: int) -> None:
    """An adapter with grown embeddings needs the tokenizer it was trained with (saved beside it)."""
    if new_vocab and len(tokenizer) > new_vocab:
        raise MergeError(
            f"the adapter's embeddings have {new_vocab} rows but its tokenizer has {len(tokenizer)} tokens; "
            f"the base {base} has {base_vocab}. Save the tokenizer used in training with the adapter."
        )
