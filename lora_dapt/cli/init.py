"""``lora-dapt init``: a commented config to start from, sized for this machine.

``lora-dapt init docs/ notes/*.md --model models/llama -o config.yaml`` writes every section and key of a
:class:`~lora_dapt.config.RunConfig`, each under its docstring as a comment (the field docs of
:mod:`lora_dapt.config`, so the file says what ``lora-dapt config`` says), with:

* ``model.name_or_path``: the model given, else the bundled SmolLM2 alias ``smollm2-135m``
  (:mod:`lora_dapt.model.aliases`);
* ``data.sources``: the paths given, each checked to name at least one file;
* ``data.seq_len``, ``train.batch_size``, ``train.gradient_accumulation_steps``,
  ``adapter.gradient_checkpointing``, ``adapter.r`` (and the optimizer on a GPU): what
  :func:`lora_dapt.planning.memory.plan` says fits this machine's memory, the GPU's when there is one, else
  the RAM available now. On a CPU the plan is capped at :data:`CPU_MAX_SEQ_LEN` tokens per block and
  :data:`CPU_TOKENS_PER_STEP` tokens per optimizer step: longer steps take minutes each there;
* the optional ``sft`` section written commented out, so ``lora-dapt train`` does not run it.

Everything else keeps its default. An existing output file is refused without ``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .._sections import field_docs, plain
from ..config import SECTIONS, AdapterConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from ..errors import ConfigError, DataError
from ..model.aliases import ALIASES, DEFAULT_MODEL, bundled_gguf

__all__ = [
    "CPU_MAX_SEQ_LEN",
    "CPU_TOKENS_PER_STEP",
    "InitResult",
    "Machine",
    "add_init_arguments",
    "init_command",
    "init_config",
    "machine_memory",
    "render_config",
]

CPU_MAX_SEQ_LEN = 1024
"""Longest block ``init`` plans on a CPU (the DataConfig default); a GPU may get up to 4096."""

CPU_TOKENS_PER_STEP = 8192
"""Tokens per optimizer step ``init`` plans on a CPU (a GPU gets plan's 32,768)."""

USABLE_RAM = 0.8
"""Share of the RAM available now that a CPU plan may take (the rest: the OS, the data, the Python heap)."""

WIDTH = 110
"""Longest line of the written file."""


@dataclass(frozen=True)
class Machine:
    """The memory a run on this machine may use, and where it is."""

    device: str
    """'cuda' or 'cpu'."""
    memory: int
    """Bytes the plan may use: the GPU's total memory, or :data:`USABLE_RAM` of the RAM available now."""
    description: str
    """What it is, for the file's header: 'GPU NVIDIA H100 (79.1 GiB)', 'CPU (12.3 GiB of RAM usable)'."""


@dataclass
class InitResult:
    """What :func:`init_config` made: the config, its commented YAML text and what sized it."""

    config: RunConfig
    text: str
    machine: Machine
    notes: list[str]
    """Why seq_len and batch are what they are (the plan's reasons), also in the file's header."""


def machine_memory() -> Machine:
    """The memory of the first CUDA device, else :data:`USABLE_RAM` of the RAM available now
    (:func:`~lora_dapt.planning.available.free_memory_bytes`)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Machine(
            "cuda", int(props.total_memory), f"GPU {props.name} ({props.total_memory / 2**30:.1f} GiB)"
        )
    from ..planning.available import free_memory_bytes

    available = free_memory_bytes("cpu")
    usable = int(available * USABLE_RAM)
    return Machine("cpu", usable, f"CPU ({usable / 2**30:.1f} GiB of RAM usable)")


def _given_machine(gpu_memory: str | None) -> Machine | None:
    """The machine ``--gpu-memory`` describes, or None (this one)."""
    if gpu_memory is None:
        return None
    from ..planning.memory import parse_memory

    size = parse_memory(gpu_memory)
    return Machine("cuda", size, f"a GPU of {size / 2**30:.1f} GiB (--gpu-memory {gpu_memory})")


def init_config(
    data: Sequence[str] = (), model: str | None = None, *, machine: Machine | None = None
) -> InitResult:
    """A RunConfig for ``data`` and ``model`` (default: the bundled ``smollm2-135m``), sized by ``plan``
    for ``machine`` (default: this one), and its commented YAML (:func:`render_config`).

    Example::

        result = init_config(["docs/"], "models/llama-3.2-1b")
        Path("config.yaml").write_text(result.text)
    """
    from ..planning.memory import plan

    model = model or DEFAULT_MODEL
    bundled_gguf(
        model
    )  # an alias's package must be installed: plan knows its shape by name, training does not
    sources = [str(s) for s in data]
    _check_sources(sources)
    machine = machine or machine_memory()
    cpu = machine.device == "cpu"
    limits: dict[str, Any] = (
        {"max_seq_len": CPU_MAX_SEQ_LEN, "tokens_per_step": CPU_TOKENS_PER_STEP} if cpu else {}
    )
    p = plan(model, machine.memory, **limits)
    notes = list(p.notes)
    if not p.fits:
        notes.insert(0, "the smallest settings tried are written; a run may run out of memory")
    if cpu and p.optimizer != "adamw":
        notes.append(f"optimizer adamw, not the plan's {p.optimizer}: 8-bit optimizers need CUDA")
    cfg = RunConfig(
        model=ModelConfig(name_or_path=model, quantization=p.quantization),  # type: ignore[arg-type]
        adapter=AdapterConfig(r=p.rank, alpha=2 * p.rank, gradient_checkpointing=p.gradient_checkpointing),
        data=DataConfig(sources=sources, seq_len=p.seq_len),
        train=TrainConfig(
            batch_size=p.micro_batch_size,
            gradient_accumulation_steps=p.gradient_accumulation_steps,
            optimizer="adamw" if cpu else p.optimizer,  # type: ignore[arg-type]
        ),
    )
    header = [
        "lora_dapt run config written by `lora-dapt init`: every key, under what it means.",
        f"model: {model}" + (f": {ALIASES[model.lower()].description}" if model.lower() in ALIASES else ""),
        f"seq_len, batch, accumulation, checkpointing and rank: `lora-dapt plan` for {machine.description}:",
        *(f"  - {n}" for n in notes),
        "next: `lora-dapt prepare THIS_FILE` (corpus statistics), then `lora-dapt train THIS_FILE`.",
    ]
    if not sources:
        header.append("data.sources is empty: list your text files, globs or directories there first.")
    return InitResult(cfg, render_config(cfg, header), machine, notes)


def _check_sources(sources: Sequence[str]) -> None:
    """Each source must name at least one file (a typo is caught now, not at training time)."""
    from ..data.resolve import resolve_path

    empty = [s for s in sources if not resolve_path(s).files]
    if empty:
        raise DataError(
            f"no files found for data source(s) {', '.join(repr(s) for s in empty)}: give existing files, "
            "globs or directories of text"
        )


def render_config(cfg: RunConfig, header: Sequence[str] = ()) -> str:
    """``cfg`` as YAML with each section's and each key's docstring as a comment above it; a missing ``sft``
    section is written with its defaults, commented out. ``header`` lines open the file as comments."""
    lines = [line for text in header for line in _comment(text, "")]
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name, None)
        off = section is None
        section = section if section is not None else cls()
        lines.append("")
        lines += _comment(cls.__doc__.strip().splitlines()[0], "")
        if off:
            lines += _comment(f"optional; uncomment the {name} section to use it", "")
        body = [f"{name}:"]
        docs = field_docs(cls)
        for f in dataclasses.fields(section):
            if f.name.startswith("_"):
                continue
            if f.name in docs:
                body += _comment(docs[f.name], "  ")
            body.append(f"  {f.name}: {_scalar(plain(getattr(section, f.name)))}")
        lines += [f"# {line}" if off else line for line in body]
    return "\n".join(lines).lstrip("\n") + "\n"


def _comment(text: str, indent: str) -> list[str]:
    # no breaks inside words or at hyphens: joining the lines with spaces gives the docstring back
    lines = textwrap.wrap(
        text,
        WIDTH,
        initial_indent=f"{indent}# ",
        subsequent_indent=f"{indent}# ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return lines or [f"{indent}#"]


def _scalar(value: Any) -> str:
    """A value as one line of YAML flow style (``[a.txt, b.txt]``, ``null``, ``'1e-4'`` where quoting is due)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


def add_init_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``lora-dapt init``'s arguments."""
    parser.add_argument("data", nargs="*", help="domain text: files, globs or directories (data.sources)")
    parser.add_argument(
        "--model",
        default=None,
        help=f"model directory, .gguf file or hub id (default {DEFAULT_MODEL}: the bundled SmolLM2-135M)",
    )
    parser.add_argument(
        "-o", "--output", default="config.yaml", help="file to write (default config.yaml; - prints)"
    )
    parser.add_argument(
        "--gpu-memory",
        default=None,
        help="size the run for a GPU of this memory (e.g. 24GB) instead of this machine",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    return parser


def init_command(args: argparse.Namespace) -> int:
    """Run ``lora-dapt init``: write (or print) the config; exit status 0."""
    out = None if args.output == "-" else Path(args.output)
    if out is not None and out.exists() and not args.force:
        raise ConfigError(
            f"{out} exists; pass --force to replace it, or -o another file", header="cannot write config"
        )
    if out is not None and out.is_dir():
        raise ConfigError(f"{out} is a directory; give a file name with -o", header="cannot write config")
    result = init_config(args.data, args.model, machine=_given_machine(args.gpu_memory))
    if out is None:
        print(result.text, end="")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.text, encoding="utf-8")
    cfg = result.config
    print(
        f"config written: {out}\n  model {cfg.model.name_or_path}, {len(cfg.data.sources)} data source(s), "
        f"seq_len {cfg.data.seq_len}, batch {cfg.train.batch_size} x accumulation "
        f"{cfg.train.gradient_accumulation_steps}, LoRA rank {cfg.adapter.r} ({result.machine.description})\n"
        f"  next: lora-dapt prepare {out}"
    )
    return 0
