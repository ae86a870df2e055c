"""Model shapes: the sizes that set a training step's memory, read without loading any weights.

A shape comes from a known name (the table in ``known_models.json``, package data), a local model directory
(its config.json, or the config in a GGUF file's metadata), a transformers config or config dict, or a
loaded model. Every case ends the same way: the module tree is built on the meta device and its layers are
counted, so the numbers come from the real architecture rather than a per-family formula.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelLoadError


@lru_cache(maxsize=1)
def _known_models_text() -> str:
    # the file's text is cached (a str cannot be changed by a caller); every call parses its own copy
    return resources.files(__package__).joinpath("known_models.json").read_text(encoding="utf-8")


def known_models() -> dict[str, dict[str, Any]]:
    """Known model name -> the config fields that set memory (a fresh copy: change it freely).

    >>> known_models()["llama-3-8b"]["num_key_value_heads"]
    8
    """
    return {name: entry["config"] for name, entry in json.loads(_known_models_text())["models"].items()}


def model_aliases() -> dict[str, str]:
    """Other spellings of the known names (lower case) -> the known name."""
    return dict(json.loads(_known_models_text())["aliases"])


def known_name(text: str) -> str | None:
    """The known model ``text`` names (any case, or an alias such as 'Llama-3.1-8B'), or None.

    >>> known_name("Llama-3.1-8B-Instruct"), known_name("models/my-llama")
    ('llama-3-8b', None)
    """
    key = text.lower()
    key = model_aliases().get(key, key)
    return key if key in known_models() else None


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set memory, read from a model's config and its module tree (built on the meta device).

    ``linears`` lists every linear layer LoRA can target (output head excluded) as (leaf name, in, out).
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    linears: tuple[tuple[str, int, int], ...]
    embedding_params: int
    """Input embeddings plus (when untied) the output head."""
    other_params: int
    """Norms, biases and anything else that is neither a targetable linear layer nor an embedding."""
    max_position_embeddings: int | None = None

    @property
    def linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linears)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params


def model_shape(model_or_config: Any) -> ModelShape:
    """Read the sizes of a model from a known name, a directory (config.json or GGUF), a config or a model.

    The module tree is built on the meta device (no memory, about a second for 8B), so every architecture
    transformers knows is counted from its real layers, not from a formula.

    >>> s = model_shape("llama-3-8b")
    >>> s.total_params, s.num_layers, len(s.linears)
    (8030261248, 32, 224)
    """
    import torch
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if isinstance(model_or_config, ModelShape):
        return model_or_config
    if isinstance(model_or_config, torch.nn.Module):
        from ..model.lora import base_model

        module = base_model(model_or_config)
        name = getattr(module.config, "name_or_path", "") or type(module).__name__
        return _shape_of_module(module, _text_config(module.config), name)
    if isinstance(model_or_config, PretrainedConfig):
        cfg = model_or_config
        name = getattr(cfg, "name_or_path", "") or cfg.model_type
    elif isinstance(model_or_config, dict):
        cfg = _config_from_dict(model_or_config)
        name = cfg.model_type
    elif isinstance(model_or_config, (str, Path)):
        cfg, name = _load_config(model_or_config)
    else:
        raise ConfigError(
            f"estimate_memory: cannot read a model from {type(model_or_config).__name__}; pass a model, a "
            "transformers config, a config dict, a model directory or a known name such as 'llama-3-8b'"
        )
    if getattr(cfg, "quantization_config", None) is not None:
        # a pre-quantized checkpoint's config (GGUF, bitsandbytes): count the architecture, not its storage
        cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    try:
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot build {name} from its config: {e}") from None
    return _shape_of_module(module, _text_config(cfg), name)


def _text_config(cfg: Any) -> Any:
    # multimodal configs keep the language model's sizes in text_config
    return getattr(cfg, "text_config", None) or cfg


def _config_from_dict(data: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _load_config(model: str | Path) -> tuple[Any, str]:
    """(transformers config, display name) of a known name, a GGUF checkpoint or a model directory.

    The path is resolved like ``load_base_model`` resolves it (:func:`lora_dapt.model.gguf.find_gguf`: a
    .gguf file, or a directory without config.json holding exactly one), but a GGUF file is never
    dequantized (that takes minutes): its config is read from the GGUF metadata alone. Hub ids are not
    fetched.
    """
    from transformers import AutoConfig

    from ..model.gguf import find_gguf
    from ..model.load import is_hub_id

    text = str(model)
    known = known_name(text)
    if known is not None:
        return _config_from_dict(known_models()[known]), known
    p = Path(text)
    try:
        gguf = find_gguf(p)
    except ModelLoadError as e:  # several GGUF files: plan has no gguf_file argument, a file path does it
        raise ModelLoadError(f"{e}, or pass the path of one of them") from None
    try:
        if gguf is not None:
            directory, gguf_file = gguf
            return AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file), Path(gguf_file).stem
        if (p / "config.json").is_file():
            return AutoConfig.from_pretrained(str(p)), p.name
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config of {text}: {e}") from None
    hub = (
        " Hub ids are not fetched: download the model (its config.json is enough) and pass its directory."
        if is_hub_id(text) and not p.exists()
        else ""
    )
    raise ModelLoadError(
        f"model {text!r} is neither a known model ({', '.join(sorted(known_models()))}) nor a directory with "
        f"config.json or a .gguf file. Pass a local model directory, or one of the known names.{hub}"
    )


def _shape_of_module(module: Any, tcfg: Any, name: str) -> ModelShape:
    import torch

    from ..model.bnb import is_quantized_linear, logical_numel

    head = module.get_output_embeddings()
    emb = module.get_input_embeddings()
    linears = []
    seen: set[int] = set()
    embedding_params = 0
    for p in (emb.weight, getattr(head, "weight", None)):
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            embedding_params += p.numel()
    for mod_name, mod in module.named_modules():
        if mod is head or mod is emb:
            continue
        parts = mod_name.split(".")
        if "base_layer" in parts or any(p.startswith("lora_") for p in parts):
            continue  # inside a peft LoRA wrapper: the wrapper stands for its base layer
        layer = getattr(mod, "base_layer", mod)
        if isinstance(layer, torch.nn.Linear) or is_quantized_linear(layer):
            linears.append((parts[-1], int(layer.in_features), int(layer.out_features)))
            seen.add(id(layer.weight))
    other = 0
    for pname, p in module.named_parameters():
        if id(p) in seen or "lora_" in pname:
            continue
        seen.add(id(p))
        other += logical_numel(p)
    hidden = int(tcfg.hidden_size)
    heads = int(getattr(tcfg, "num_attention_heads", 1))
    head_dim = int(getattr(tcfg, "head_dim", None) or hidden // heads)
    return ModelShape(
        name=str(name),
        vocab_size=int(tcfg.vocab_size),
        hidden_size=hidden,
        intermediate_size=int(getattr(tcfg, "intermediate_size", None) or 4 * hidden),
        num_layers=int(tcfg.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(tcfg, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        tie_embeddings=bool(getattr(tcfg, "tie_word_embeddings", False)),
        linears=tuple(linears),
        embedding_params=int(embedding_params),
        other_params=int(other),
        max_position_embeddings=getattr(tcfg, "max_position_embeddings", None),
    )
