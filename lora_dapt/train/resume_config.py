"""Resuming under a changed config: which changes a checkpoint can take, and making the allowed ones real.

A resumed run continues the weights, optimizer moments, schedule position and data order of its
checkpoint. Some settings cannot change under that (the adapter's shape, the base model, the corpus, the
data order); others can, from the current step on (the length, the learning rate, how often to log or
save). :data:`RESUME_RULES` puts every config key in exactly one class (a test checks that no key is
forgotten), and :func:`check_resume_config` compares the new config with the run's ``config.yaml``
before anything in the run directory is written: one :class:`~lora_dapt.errors.ConfigError` names every
change a resume cannot take; the others are logged.

Two classes need more than a log line:

* ``schedule`` and ``length`` changes: the Trainer restores the optimizer's and the scheduler's state from
  the checkpoint, learning rates and weight decay included, which would silently keep the old values.
  :class:`ApplyCurrentSchedule` puts the current config's values back after that restore, so the schedule
  is the one of the new settings (``lr_factor(step, new_total)``) from the current step on.
* ``pinned`` evaluation settings: "before" and "after" must score the same tokens, so a resumed run
  evaluates with the settings its "before" evaluation recorded (:func:`scored_with`,
  :func:`pinned_eval_config`), not the new ones, and says so.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ..config import SECTIONS, EvalConfig, RunConfig, SFTConfig, TrainConfig
from ..errors import ConfigError
from .schedule import group_settings

if TYPE_CHECKING:
    from ..rundir import Resume, RunDir

log = logging.getLogger("lora_dapt")

RESUME_RULES: dict[str, frozenset[str]] = {
    # cannot change on a resume: the checkpoint's weights, optimizer state or data position depend on them
    "fixed": frozenset(
        {
            "model.name_or_path",
            "model.gguf_file",
            "model.quantization",
            "model.compute_dtype",
            "model.double_quant",
            "model.quant_storage",
            "adapter.r",
            "adapter.alpha",
            "adapter.target_modules",
            "adapter.use_rslora",
            "adapter.use_dora",
            "adapter.train_embeddings",
            "adapter.new_tokens",
            "adapter.new_tokens_min_frequency",
            "data.sources",
            "data.text_field",
            "data.seq_len",
            "data.eval_fraction",
            "data.eval_sources",
            "data.seed",
            "data.normalize",
            "data.min_chars",
            "data.dedupe",
            "data.near_dedupe",
            "data.near_dedupe_threshold",
            "data.replay_sources",
            "data.replay_fraction",
            "data.mixture",
            "data.extensions",
            "data.add_bos",
            "data.add_eos",
            "train.batch_size",
            "train.gradient_accumulation_steps",
            "train.optimizer",
            "train.seed",
            "sft.model_or_run",
            "sft.data",
            "sft.format",
            "sft.seq_len",
            "sft.train_on_prompt",
            "sft.packing",
            "sft.eval_fraction",
            "sft.stack",
        }
    ),
    # the run's length: the schedule is rebuilt for the new total, from the current step
    "length": frozenset({"train.max_steps", "train.epochs", "train.max_tokens"}),
    # the schedule and the optimizer's settings: the new values apply from the current step
    "schedule": frozenset(
        {
            "train.learning_rate",
            "train.embedding_learning_rate",
            "train.scheduler",
            "train.warmup_steps",
            "train.warmup_ratio",
            "train.min_lr_ratio",
            "train.decay_ratio",
            "train.weight_decay",
        }
    ),
    # what the 'before' evaluation scored: kept as stored, so before and after score the same tokens
    "pinned": frozenset({"eval.max_eval_tokens", "eval.general", "eval.general_sources"}),
    # free to change: they apply from now on and do not change what was trained so far
    "free": frozenset(
        {
            "model.trust_remote_code",
            "model.attn_implementation",
            "model.device",
            "adapter.dropout",
            "adapter.gradient_checkpointing",
            "adapter.init_lora_weights",
            "data.num_proc",
            "data.cache_dir",
            "train.max_grad_norm",
            "train.precision",
            "train.compile",
            "train.logging_every",
            "train.save_every",
            "train.eval_every",
            "train.save_total_limit",
            "train.on_nonfinite",
            "train.num_workers",
            "train.report_to",
            "train.run_name",
            "eval.enabled",
            "eval.batch_size",
            "eval.max_general_ppl_increase",
            "eval.prompts",
            "eval.max_new_tokens",
            "eval.original_base",
            "eval.restore_best",
            "eval.probes",
            "eval.lm_eval_tasks",
            "eval.lm_eval_include_path",
            "merge.enabled",
            "merge.dtype",
            "merge.base_source",
            "merge.output_dir",
            "merge.tolerance",
            "merge.ppl_tolerance",
        }
    ),
    # how the run starts, not what it trains: never compared
    "control": frozenset({"train.output_dir", "train.resume_from", "train.overwrite"}),
}
"""Every config key (``section.key``) in exactly one class; an SFT key that TrainConfig also has (such as
``sft.learning_rate``) follows ``train.<key>``."""

_WHY = {
    "model": "the base model the adapter is trained on",
    "adapter": "the adapter's shape: the checkpoint's weights are of the old one",
    "data": "the corpus: the checkpoint's data position and the held-out split are of the old one",
    "sft": "the instruction data: the checkpoint's data position is of the old one",
    "train": "the checkpoint's optimizer state and data order are of the old value",
}
_SHORT = 120
"""Longest repr of a value in a message."""


def all_config_keys() -> list[str]:
    """Every key of every config section, as ``section.key``."""
    return [
        f"{name}.{f.name}"
        for name, cls in SECTIONS.items()
        for f in fields(cls)
        if not f.name.startswith("_")
    ]


def resume_rule(key: str) -> str | None:
    """The class of ``section.key`` in :data:`RESUME_RULES`; None for a key the table does not know."""
    section, _, name = key.partition(".")
    if section == "sft" and name in TrainConfig.__dataclass_fields__:
        key = f"train.{name}"
    found = [rule for rule, keys in RESUME_RULES.items() if key in keys]
    return found[0] if found else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 5] + " ...]"


def _flat(config: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section in sections
        if isinstance(config.get(section), dict)
        for key, value in config[section].items()
    }


def compare_configs(
    stored: dict[str, Any] | None, new: dict[str, Any], *, run_dir: str, sft: bool = False
) -> list[str]:
    """Compare the config of a resume (``new``, sections of plain values) with the run's stored config.

    Keys a resume cannot take (class 'fixed', or a key the table does not know) raise one
    :class:`~lora_dapt.errors.ConfigError` naming each key, its old and new value and the fix; the others
    are logged. Only keys present in both are compared (an older config.yaml may lack newer keys). An SFT
    run compares its ``sft`` section (which carries the training keys), a DAPT run its ``data`` and
    ``train`` sections. Returns the changed keys that were allowed.
    """
    if not stored:
        return []
    sections = ("model", "adapter", "sft" if sft else "data", "eval", "merge") + (() if sft else ("train",))
    old, now = _flat(stored, sections), _flat(new, sections)
    refused, allowed = [], []
    for key in sorted(old.keys() & now.keys()):
        if _same(old[key], now[key]):
            continue
        rule = resume_rule(key)
        change = f"{key}: {_short(old[key])} -> {_short(now[key])}"
        if rule in (None, "fixed"):
            refused.append(f"{change} ({_WHY.get(key.partition('.')[0], 'not resumable')})")
        elif rule != "control":
            allowed.append((key, change, rule))
    if refused:
        raise ConfigError(
            refused,
            header=(
                f"cannot resume {run_dir} with a changed config: its checkpoint was trained with the old "
                "values. Resume without these changes, or train with them as a new run: another "
                "train.output_dir, or train.overwrite=true without train.resume_from (deletes this run's "
                "checkpoints and metrics)"
            ),
        )
    notes = {
        "length": "the schedule is rebuilt for the new length, from the current step",
        "schedule": "applies from the current step",
        "pinned": "the 'before' evaluation's stored setting is kept, so before and after score the same tokens",
        "free": "applies from now on",
    }
    for _, change, rule in allowed:
        log.info("resuming with a changed setting: %s (%s)", change, notes[rule])
    return [key for key, _, _ in allowed]


def check_resume_config(
    resume: Resume, run: RunDir, cfg: TrainConfig, new: RunConfig | dict[str, Any], total_steps: int
) -> None:
    """Before a resume from ``resume`` writes anything (``RunDir.start`` calls this under the lock, once the
    checkpoint is chosen and validated): compare ``new`` (the RunConfig, or the sections a Python caller's
    objects give) with the run's ``config.yaml``; refuse what cannot resume, log what can
    (:func:`compare_configs`). A new length (``total_steps`` optimizer steps) shorter than what the
    checkpoint already trained is refused too."""
    import yaml

    sections = new.to_dict() if isinstance(new, RunConfig) else new
    plain = yaml.safe_load(yaml.safe_dump(sections, sort_keys=False))  # the values as config.yaml holds them
    changed = compare_configs(run.read_config(), plain, run_dir=str(run.path), sft=isinstance(cfg, SFTConfig))
    if any(resume_rule(key) == "length" for key in changed) and resume.step > total_steps:
        raise ConfigError(
            f"{_length_setting(cfg)}: the run is now {total_steps} optimizer steps long, but its "
            f"checkpoint {resume.checkpoint} is already at step {resume.step}. Give a length of at least "
            f"{resume.step} steps (train.max_steps={resume.step} ends it there), or resume from an earlier "
            "checkpoint (train.resume_from=PATH)",
            header="cannot resume with a shorter run",
        )


def log_resume_length(resume: Resume | None, total_steps: int, cfg: TrainConfig) -> None:
    """Say where a resumed run stands: at step N of the (possibly new) total."""
    if resume is not None and resume.step < total_steps:
        log.info("resuming at step %d of %d (%s)", resume.step, total_steps, _length_setting(cfg))


def _length_setting(cfg: TrainConfig) -> str:
    if cfg.max_steps is not None:
        return f"train.max_steps={cfg.max_steps}"
    if cfg.epochs is not None:
        return f"train.epochs={cfg.epochs}"
    if cfg.max_tokens is not None:
        return f"train.max_tokens={cfg.max_tokens}"
    return "one epoch"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


# -------------------------------------------------------------------------------------------------------------
# The evaluation's token set: recorded by 'before', used by 'during' and 'after'
# -------------------------------------------------------------------------------------------------------------

SCORED_WITH = "scored_with"
"""The key of ``eval_before.json`` that records what the 'before' evaluation scored."""


def texts_fingerprint(texts: list[str] | None) -> str | None:
    """sha256 of a list of texts (the general-text sample), to tell whether 'after' scores the same texts."""
    if not texts:
        return None
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    return digest.hexdigest()


def scored_with(
    eval_cfg: EvalConfig, before: dict[str, Any], general_texts: list[str] | None
) -> dict[str, Any]:
    """What a 'before' evaluation scored: its settings and token counts (stored in ``eval_before.json``)."""
    return {
        "max_eval_tokens": eval_cfg.max_eval_tokens,
        "general": eval_cfg.general,
        "general_sources": list(eval_cfg.general_sources),
        "domain_tokens": (before.get("domain") or {}).get("tokens"),
        "general_tokens": (before.get("general") or {}).get("tokens"),
        "general_texts_sha256": texts_fingerprint(general_texts),
    }


def recorded_before(run: RunDir, resume: Resume | None) -> dict[str, Any] | None:
    """What a resumed run's 'before' evaluation scored (``scored_with`` in ``eval_before.json``); None for a
    fresh start or a run that recorded nothing."""
    if resume is None:
        return None
    recorded = (run.read_eval_before() or {}).get(SCORED_WITH)
    return recorded if isinstance(recorded, dict) else None


def pinned_eval_config(eval_cfg: EvalConfig, recorded: dict[str, Any] | None) -> EvalConfig:
    """``eval_cfg`` with the settings the 'before' evaluation ``recorded`` (see :func:`scored_with`), so a
    resumed run's 'during' and 'after' evaluations score the same tokens; each setting that differs is
    logged. None (a run that recorded nothing): ``eval_cfg`` unchanged."""
    if not recorded:
        return eval_cfg
    kept = {k: recorded[k] for k in ("max_eval_tokens", "general", "general_sources") if k in recorded}
    for key, value in kept.items():
        if not _same(getattr(eval_cfg, key), value):
            log.warning(
                "eval.%s: this session asks %s, the 'before' evaluation scored with %s: using the stored %s "
                "so before and after score the same tokens",
                key,
                _short(getattr(eval_cfg, key)),
                _short(value),
                _short(value),
            )
    return eval_cfg.replace(**kept)


def check_general_texts(recorded: dict[str, Any] | None, general_texts: list[str] | None) -> None:
    """Warn when the general texts of a resumed run are not the ones its 'before' evaluation scored (their
    files changed, or other texts were passed from Python): the general before/after comparison is then
    not on the same text."""
    if not recorded or recorded.get("general_texts_sha256") is None or not general_texts:
        return
    if texts_fingerprint(general_texts) != recorded["general_texts_sha256"]:
        log.warning(
            "the general texts differ from the ones the 'before' evaluation scored (sha256 %s...): the "
            "general before/after comparison is not on the same text. Restore them (eval.general_sources) "
            "to compare",
            str(recorded["general_texts_sha256"])[:12],
        )


# -------------------------------------------------------------------------------------------------------------
# The schedule of the current config, after the Trainer restored the checkpoint's
# -------------------------------------------------------------------------------------------------------------


class ApplyCurrentSchedule(TrainerCallback):
    """Put the current config's learning rates and weight decay back after a resume restored the old ones.

    The Trainer loads ``optimizer.pt`` (each group's lr and weight decay) and ``scheduler.pt`` (the peak
    learning rates) after it built both from the current config, so a changed learning rate would be ignored
    and the first resumed step would take the old schedule's value. At the start of training (after that
    restore) this sets each group's peak to the current config's and its lr to
    ``peak * lr_factor(step, new_total)``: the schedule of the new settings from the current step on.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.settings = group_settings(cfg)

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        if optimizer is None or lr_scheduler is None:
            return control
        groups = optimizer.param_groups
        for i, group in enumerate(groups):
            wanted = self.settings.get(group.get("name", "lora"), self.settings["lora"])
            group["weight_decay"] = wanted["weight_decay"]
            group["initial_lr"] = wanted["lr"]
            lr_scheduler.base_lrs[i] = wanted["lr"]
        factors = [fn(lr_scheduler.last_epoch) for fn in lr_scheduler.lr_lambdas]
        for group, base, factor in zip(groups, lr_scheduler.base_lrs, factors, strict=True):
            group["lr"] = base * factor
        lr_scheduler._last_lr = [group["lr"] for group in groups]
        return control
