"""Model cards: the README.md of a run's adapter (written by training) and of a merged model (by the merge).

A card says what a stranger needs to use the weights: the base model as the user named it (a ``.gguf`` file's
path for a GGUF base, never lora_dapt's cache copy), the data (documents, tokens, the eval split), the training
settings, the before/after domain and general perplexity, the merge report (merged model), and how to load it.

The cards are built from values in memory (:class:`RunFacts`, made from a ``TrainResult`` and its inputs by
training, or read back from a run directory through :class:`~lora_dapt.rundir.RunDir` by the from-disk entry
point ``merge_run``) and a :class:`~lora_dapt.export.report.MergeReport`; this module reads no run files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model.load import ModelSource
    from ..rundir import RunDir
    from ..train.pretrain import TrainResult
    from .report import MergeReport

CARD = "README.md"

DATA_KEYS = (
    ("documents_kept", "documents kept"),
    ("train_documents", "train documents"),
    ("eval_documents", "eval documents"),
    ("train_tokens", "train tokens"),
    ("eval_tokens", "eval tokens"),
    ("train_blocks", "train blocks"),
    ("eval_blocks", "eval blocks"),
    ("replay_tokens", "replay tokens"),
)
"""Corpus statistics a card shows (CorpusStats names, SFT stats where they share them), in order."""


def source_name(name_or_path: str | Path, gguf_file: str | None = None) -> str:
    """The base as the user named it: ``name_or_path``, or the path of the GGUF file inside it.

    Example: ``source_name("models/smollm2", "q8_0.gguf") == "models/smollm2/q8_0.gguf"``.
    """
    name = str(name_or_path)
    if gguf_file and Path(name).name != gguf_file:
        return str(Path(name) / gguf_file)
    return name


def record_base_name(peft_model: Any, source: ModelSource) -> str:
    """Set every adapter's ``base_model_name_or_path`` (peft's field, saved in ``adapter_config.json``) to
    the source as the user named it. peft records what ``from_pretrained`` loaded, which for a GGUF base is
    lora_dapt's dequantized copy in the local cache: a path nobody else has. Returns the name."""
    name = source_name(source.name_or_path, source.gguf_file)
    for cfg in getattr(peft_model, "peft_config", {}).values():
        cfg.base_model_name_or_path = name
    return name


@dataclass
class RunFacts:
    """What a card says about the training run behind an adapter."""

    base_name: str
    """The base as the user named it (:func:`source_name`)."""
    quantization: str = "none"
    rank: int | None = None
    alpha: float | None = None
    target_modules: str | None = None
    train_embeddings: bool = False
    learning_rate: float | None = None
    steps: int | None = None
    tokens_trained: int | None = None
    seq_len: int | None = None
    data: dict[str, int] = field(default_factory=dict)
    """The :data:`DATA_KEYS` the run's corpus statistics hold."""
    forgetting: dict[str, Any] = field(default_factory=dict)
    """``forgetting_report(before, after)``: split -> ppl_before, ppl_after, ppl_change, bpb_*."""
    forgetting_reference: str = ""
    """What ``forgetting`` compares with (the original 16-bit model, or the base as trained)."""
    stopped: str | None = None

    @classmethod
    def from_training(
        cls,
        result: TrainResult,
        source: ModelSource,
        peft_model: Any,
        learning_rate: float,
        seq_len: int | None,
        stats: Any = None,
    ) -> RunFacts:
        """From what training holds in memory: its result, base, LoRA model, settings and corpus stats."""
        peft_cfg = next(iter(getattr(peft_model, "peft_config", {}).values()), None)
        return cls(
            base_name=source_name(source.name_or_path, source.gguf_file),
            quantization=source.quantization,
            **_adapter_fields(peft_cfg),
            learning_rate=learning_rate,
            steps=result.steps,
            tokens_trained=result.tokens_trained,
            seq_len=seq_len,
            data=_data_fields(stats.to_dict() if hasattr(stats, "to_dict") else stats),
            forgetting=dict(result.forgetting or {}),
            forgetting_reference=result.forgetting_reference,
            stopped=result.stopped,
        )

    @classmethod
    def from_run(cls, run: RunDir) -> RunFacts | None:
        """Read back from a finished run directory (``merge_run``'s way in); None without run info."""
        source = run.read_run_info()
        if source is None:
            return None
        summary = run.read_summary() or {}
        config = run.read_config() or {}
        adapter, train = config.get("adapter") or {}, config.get("train") or {}
        data_cfg = config.get("data") or {}
        stats = summary.get("data_stats") or {}
        seq_len = stats.get("seq_len") or data_cfg.get("seq_len") or (config.get("sft") or {}).get("seq_len")
        return cls(
            base_name=source_name(source.name_or_path, source.gguf_file),
            quantization=source.quantization,
            rank=adapter.get("r"),
            alpha=adapter.get("alpha"),
            target_modules=_targets(adapter.get("target_modules")),
            train_embeddings=bool(adapter.get("train_embeddings")),
            learning_rate=train.get("learning_rate"),
            steps=summary.get("steps"),
            tokens_trained=summary.get("tokens_trained"),
            seq_len=seq_len,
            data=_data_fields(stats),
            forgetting=dict(summary.get("forgetting") or {}),
            forgetting_reference=str(summary.get("forgetting_reference") or ""),
            stopped=summary.get("stopped"),
        )


def _adapter_fields(peft_cfg: Any) -> dict[str, Any]:
    if peft_cfg is None:
        return {}
    return {
        "rank": getattr(peft_cfg, "r", None),
        "alpha": getattr(peft_cfg, "lora_alpha", None),
        "target_modules": _targets(getattr(peft_cfg, "target_modules", None)),
        "train_embeddings": bool(getattr(peft_cfg, "modules_to_save", None)),
    }


def _targets(value: Any) -> str | None:
    if value is None:
        return None
    return ", ".join(sorted(value)) if isinstance(value, (set, list, tuple)) else str(value)


def _data_fields(stats: dict[str, Any] | None) -> dict[str, int]:
    stats = stats or {}
    return {k: int(stats[k]) for k, _ in DATA_KEYS if isinstance(stats.get(k), (int, float))}


# ---------------------------------------------------------------------------------------------------------------
# The cards
# ---------------------------------------------------------------------------------------------------------------


def _front_matter(base_name: str, library: str) -> list[str]:
    from ..model.load import is_hub_id

    lines = [
        "---",
        f"library_name: {library}",
        "tags:",
        "- lora_dapt",
        "- domain-adaptive-pretraining",
        "- lora",
    ]
    if is_hub_id(base_name):  # the hub validates base_model: only an id belongs there
        lines.append(f"base_model: {base_name}")
    return [*lines, "---", ""]


def _num(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _run_sections(facts: RunFacts) -> list[str]:
    lines = ["## Data", ""]
    if facts.data:
        lines += _table([(label, f"{facts.data[k]:,}") for k, label in DATA_KEYS if k in facts.data])
    else:
        lines += ["(no corpus statistics were recorded)", ""]
    lines += ["## Training", ""]
    lines += _table(
        [
            ("LoRA rank", _num(facts.rank)),
            ("LoRA alpha", _num(facts.alpha, "g")),
            ("target modules", facts.target_modules or "-"),
            ("trained embeddings / head", "yes" if facts.train_embeddings else "no"),
            ("learning rate", _num(facts.learning_rate, "g")),
            ("steps", _num(facts.steps)),
            ("tokens trained", _num(facts.tokens_trained, ",")),
            ("seq_len", _num(facts.seq_len)),
            ("base quantization in training", facts.quantization),
        ]
    )
    if facts.stopped:
        lines += [f"The run stopped early: {facts.stopped}.", ""]
    lines += ["## Before / after", ""]
    if facts.forgetting:
        lines += ["| split | ppl before | ppl after | change |", "|---|---|---|---|"]
        for split, r in facts.forgetting.items():
            change = r.get("ppl_change")
            lines.append(
                f"| {split} | {_num(r.get('ppl_before'), '.4f')} | {_num(r.get('ppl_after'), '.4f')} | "
                f"{'-' if change is None else format(100 * change, '+.1f') + '%'} |"
            )
        lines += [
            "",
            "Perplexity on the held-out domain split and on general text (a rise of general perplexity is "
            f"forgetting), against {facts.forgetting_reference or 'the base as trained'}.",
            "",
        ]
    else:
        lines += ["(not evaluated)", ""]
    return lines


def adapter_card(facts: RunFacts) -> str:
    """The README.md of a run's adapter: base, data, training, before/after, how to load it with peft."""
    lines = _front_matter(facts.base_name, "peft")
    lines += [
        "# LoRA adapter (continued pre-training with lora_dapt)",
        "",
        f"Base model: `{facts.base_name}`",
        "",
        *_run_sections(facts),
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{facts.base_name}")'
        + ("  # a GGUF base: add gguf_file=..." if facts.base_name.endswith(".gguf") else ""),
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/ADAPTER")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/ADAPTER")',
        "```",
        "",
        "Or merge it into a verified 16-bit model: `lora-dapt merge RUN_DIR`.",
        "",
    ]
    return "\n".join(lines)


def merged_card(report: MergeReport, facts: RunFacts | None) -> str:
    """The README.md of a merged model: base, the run (when known), the merge report, how to load it."""
    base_name = facts.base_name if facts else report.base_name
    lines = _front_matter(base_name, "transformers")
    lines += [
        "# Merged model (continued pre-training with lora_dapt)",
        "",
        f"Base model: `{base_name}`, with a LoRA adapter merged into its weights. It loads with plain "
        "transformers (no peft).",
        "",
    ]
    if facts is not None:
        lines += _run_sections(facts)
    lines += ["## Merge", ""]
    lines += _table(
        [
            ("verified", "yes" if report.passed else "NO"),
            ("dtype", f"{report.dtype} (requested {report.dtype_requested})"),
            ("why this dtype", report.dtype_reason),
            ("held-out perplexity, adapter", f"{report.perplexity_adapter:.4f}"),
            ("held-out perplexity, merged", f"{report.perplexity_merged:.4f}"),
            ("max abs logit difference", f"{report.max_abs_logit_diff:.4g}"),
            (
                "held-out text",
                f"{report.eval_texts} texts, {report.eval_tokens} tokens ({report.eval_source})",
            ),
            ("base_source", report.base_source),
        ]
    )
    lines += [
        "The full report is `merge_report.json` beside this file.",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/MODEL", dtype="{report.dtype}")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/MODEL")',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(directory: str | Path, text: str) -> Path:
    """Write ``text`` as ``directory/README.md`` (atomically: a reader never sees half a card)."""
    path = Path(directory) / CARD
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
