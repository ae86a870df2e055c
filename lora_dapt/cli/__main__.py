"""``python -m lora_dapt.cli``: the ``lora-dapt`` command (what ``torchrun``/``accelerate launch -m`` start)."""

from .main import main

raise SystemExit(main())
