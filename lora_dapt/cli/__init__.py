"""The ``lora-dapt`` command line (``main``) and the real-model quickstart (``quickstart``)."""
