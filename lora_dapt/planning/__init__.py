"""Will a run fit a GPU? Memory estimates (memory), the search for settings that fit (memory.plan), model
shapes read without weights (shapes, with the known models as package data) and ``lora-dapt plan`` (cli)."""
