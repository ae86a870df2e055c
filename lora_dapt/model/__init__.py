"""The model stage: load the base (``load``, with ``bnb`` for quantization and ``gguf`` for GGUF files),
attach LoRA (``lora``), keep packed documents apart (``attention``) and score them (``loss``).

Nothing is re-exported here: import from the submodule (``lora_dapt.model.load.load_base_model``), or the
public names from ``lora_dapt`` itself. Keeping this file empty of imports keeps ``import lora_dapt`` free of
torch and transformers until a model is needed.
"""
