"""Export: merge an adapter into a verified 16-bit model (``merge.merge_adapter``, ``merge.merge_run``) and write
it as a verified GGUF file for llama.cpp / Ollama (``gguf.export_gguf``)."""
