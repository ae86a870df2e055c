"""plan.shapes (split from memory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelLoadError

_LLAMA3 = {
    "model_type": "llama",
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
}


KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "llama-3.2-3b": {
        **_LLAMA3,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        **_LLAMA3,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "mistral-7b": {
        "model_type": "mistral",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "smollm2-1.7b": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}


_ALIASES = {
    "llama-3.1-8b": "llama-3-8b",
    "llama3-8b": "llama-3-8b",
    "llama-3-8b-instruct": "llama-3-8b",
    "llama-3.1-8b-instruct": "llama-3-8b",
    "8b": "llama-3-8b",
    "llama-3.2-3b-instruct": "llama-3.2-3b",
    "llama-3.2-1b-instruct": "llama-3.2-1b",
    "mistral-7b-v0.3": "mistral-7b",
    "qwen2.5-7b-instruct": "qwen2.5-7b",
    "smollm2-135m-instruct": "smollm2-135m",
}


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


def _text_config(cfg: Any) -> Any:
    # multimodal configs keep the language model's sizes in text_config
    return getattr(cfg, "text_config", None) or cfg


def _load_config(model: str | Path) -> tuple[Any, str]:
    from transformers import AutoConfig

    text = str(model)
    key = _ALIASES.get(text.lower(), text.lower())
    if key in KNOWN_MODELS:
        data = dict(KNOWN_MODELS[key])
        return _config_from_dict(data), key
    p = Path(text)
    try:
        if p.is_file() and p.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name), p.stem
        if p.is_dir():
            if (p / "config.json").is_file():
                return AutoConfig.from_pretrained(str(p)), p.name
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return AutoConfig.from_pretrained(str(p), gguf_file=ggufs[0].name), ggufs[0].stem
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config of {text}: {e}") from None
    raise ModelLoadError(
        f"model {text!r} is neither a known model ({', '.join(sorted(KNOWN_MODELS))}) nor a directory with "
        "config.json or a .gguf file. Pass a local model directory, or one of the known names."
    )


def _config_from_dict(data: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


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
    name = ""
    module = None
    if isinstance(model_or_config, torch.nn.Module):
        module = model_or_config
        if hasattr(module, "get_base_model"):
            module = module.get_base_model()
        cfg = module.config
        name = getattr(cfg, "name_or_path", "") or type(module).__name__
    elif isinstance(model_or_config, PretrainedConfig):
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
    if module is None:
        if getattr(cfg, "quantization_config", None) is not None:
            cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
        try:
            with torch.device("meta"):
                module = AutoModelForCausalLM.from_config(cfg)
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot build {name} from its config: {e}") from None
    return _shape_of_module(module, _text_config(cfg), name)


def _shape_of_module(module: Any, tcfg: Any, name: str) -> ModelShape:
    import torch

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
        if isinstance(layer, torch.nn.Linear) or type(layer).__name__ in ("Linear4bit", "Linear8bitLt"):
            linears.append((parts[-1], int(layer.in_features), int(layer.out_features)))
            seen.add(id(layer.weight))
    other = 0
    for pname, p in module.named_parameters():
        if id(p) in seen or "lora_" in pname:
            continue
        seen.add(id(p))
        other += p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
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
