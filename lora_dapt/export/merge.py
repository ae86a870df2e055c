"""Merge a LoRA/QLoRA adapter into a 16-bit model, and prove that the merged model is the trained one.

The merge itself is peft's ``merge_and_unload(safe_merge=True)``; what this module adds is everything around
it that users get wrong (transformers #31293, unsloth #1971 #4098, peft #2972):

* The base is always reloaded in 16-bit (or float32) before merging; merging into 4-bit weights would round
  most of the update away. ``base_source`` picks which 16-bit weights:

  - ``"original"``: the original checkpoint. The adapter was trained against the NF4 rounding of these
    weights, so the merged model differs a little from the model that was trained.
  - ``"dequantized"``: the 4-bit weights the adapter was trained on, dequantized. This reproduces the trained
    model, quantization error included.

  The report measures both against the 4-bit model as trained, so the user can choose with numbers.
* Fully trained embeddings / output head (peft ``modules_to_save``) are merged, and tied weights stay tied.
* The shipped folder is verified: it is reloaded with plain ``transformers`` (no peft) and its loss and logits
  on held-out text are compared with the adapter on the 16-bit base. A disagreement beyond ``tolerance``
  raises :class:`MergeError` and the folder is left at ``OUTPUT.partial`` for inspection, never at ``OUTPUT``.

Memory: the 4-bit model (about a quarter of the 16-bit size) is loaded first for the "as trained" numbers and
freed before the 16-bit base is loaded (kept alongside it only for ``base_source="dequantized"``); the merge is
in place and the merged model is freed before the saved copy is reloaded, so the peak is about one 16-bit
copy of the weights. Adapter files are read tensor by tensor, and ``adapter_model.bin`` pickles are only ever
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MergeConfig, ModelConfig
from ..errors import ConfigError, MergeError, ModelLoadError
from ..model.bnb import _load_dequantized, _quantized_linears
from ..model.load import load_base_model, load_tokenizer, resolve_device, resolve_model_source
from .checks import _Adapter, _check_base_name, _check_shapes, _meta_model, read_adapter

log = logging.getLogger("lora_dapt")


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


REPORT_NAME = "merge_report.json"


# Used when neither the run's eval split nor texts are given: generic prose, so the check still runs.
_FALLBACK_TEXTS = (
    "The committee reviewed the proposal in detail and asked for a revised budget before the next meeting.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower there.",
    "She opened the manual, found the section on calibration, and followed each step carefully.",
    "In 1969 the first crewed landing on the Moon was watched by millions of people around the world.",
)


@dataclass
class LossResult:
    """Mean next-token loss over the held-out tokens, and its perplexity."""

    loss: float
    perplexity: float
    tokens: int


@dataclass
class MergeReport:
    """What :func:`merge_adapter` measured; written to ``OUTPUT/merge_report.json``."""

    passed: bool
    base: str
    resolved_base: str
    adapter_dir: str
    output_dir: str
    dtype: str
    base_source: str
    trained_quantization: str
    eval_source: str
    eval_texts: int
    eval_tokens: int
    losses: dict[str, LossResult | None]
    """'adapter_4bit_as_trained', 'adapter_16bit_original', 'adapter_16bit_dequantized', 'merged'."""
    max_abs_logit_diff: float
    """max |logit| difference between the adapter on the 16-bit base and the reloaded merged model."""
    logit_scale: float
    """max |logit| of the adapter on the 16-bit base (at least 1); the tolerance is relative to it."""
    tolerance: float
    adapter_effect: float
    """max |logit| difference between the 16-bit base with and without the adapter (what the merge must keep)."""
    max_abs_logit_diff_4bit_vs_16bit: float | None
    trained_embeddings: bool
    tied_embeddings: bool
    closer_to_trained: str | None
    lower_loss: str | None
    advice: str
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few readable lines (printed by :func:`merge_adapter`)."""

        def fmt(r: LossResult | None) -> str:
            return "not measured" if r is None else f"loss {r.loss:.4f}  ppl {r.perplexity:.3f}"

        lines = [
            f"merge {'PASSED' if self.passed else 'FAILED'}: {self.adapter_dir} + {self.base} -> {self.output_dir}",
            f"  held-out text: {self.eval_texts} texts, {self.eval_tokens} tokens ({self.eval_source})",
        ]
        names = {
            "adapter_4bit_as_trained": "(a) adapter on 4-bit base, as trained",
            "adapter_16bit_original": "(b) adapter on original 16-bit base",
            "adapter_16bit_dequantized": "(b) adapter on dequantized 16-bit base",
            "merged": "(c) merged model, reloaded without peft",
        }
        for key, label in names.items():
            if key in self.losses and self.losses[key] is not None:
                lines.append(f"  {label:<42} {fmt(self.losses[key])}")
        lines.append(
            f"  max |logit diff| (b) vs (c): {self.max_abs_logit_diff:.3g} "
            f"(allowed {self.tolerance:g} x scale {self.logit_scale:.3g}; the adapter moves logits by up to "
            f"{self.adapter_effect:.3g})"
        )
        if self.max_abs_logit_diff_4bit_vs_16bit is not None:
            lines.append(f"  max |logit diff| (a) vs (b): {self.max_abs_logit_diff_4bit_vs_16bit:.3g}")
        lines.append(f"  {self.advice}")
        lines.extend(f"  problem: {p}" for p in self.problems)
        return "\n".join(lines)


def _eval_ids(tokenizer: Any, texts: Sequence[str], max_tokens: int, max_len: int) -> list[torch.Tensor]:
    """Tokenize texts (one sequence each, cut to max_len) until max_tokens tokens are collected."""
    out: list[torch.Tensor] = []
    total = 0
    for text in texts:
        if total >= max_tokens:
            break
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0][: min(max_len, max_tokens - total + 1)]
        if len(ids) >= 2:
            out.append(ids)
            total += len(ids) - 1
    return out


@torch.no_grad()
def _evaluate(model: Any, batches: list[torch.Tensor], keep_logits: int) -> tuple[LossResult, torch.Tensor]:
    """Mean next-token loss over ``batches`` and the float32 CPU logits of the first ``keep_logits`` positions
    ([keep, vocab]): enough to compare two models without holding every logit in memory."""
    model.eval()
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    nll = 0.0
    count = 0
    kept: list[torch.Tensor] = []
    n_kept = 0
    for ids in batches:
        logits = model(input_ids=ids[None].to(device)).logits[0].float()  # [T, vocab]
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:].to(device), reduction="sum"))
        count += len(ids) - 1
        if n_kept < keep_logits:
            part = logits[: keep_logits - n_kept].cpu()
            kept.append(part)
            n_kept += len(part)
    loss = nll / max(count, 1)
    ppl = math.exp(loss) if loss < 700 else float("inf")
    return LossResult(loss, ppl, count), torch.cat(kept) if kept else torch.zeros(0)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise MergeError(f"logit shapes differ between models: {list(a.shape)} vs {list(b.shape)}")
    return float((a - b).abs().max()) if a.numel() else 0.0


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing ancestor)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _estimate_bytes(meta: Any, dtype: torch.dtype, new_vocab: int | None) -> int:
    seen: set[int] = set()
    n = 0
    for p in meta.parameters():  # tied parameters are counted once, as they are saved once
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    if new_vocab:
        emb = meta.get_input_embeddings().weight
        n += (new_vocab - emb.shape[0]) * emb.shape[1] * 2
    return n * torch.finfo(dtype).bits // 8


def _tokenizer_for(adapter_dir: Path, source: str | Path, trust_remote_code: bool) -> Any:
    """The tokenizer saved with the adapter (training saves it there; SFT may have changed it), else the base's."""
    if any(
        (adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return load_tokenizer(adapter_dir, trust_remote_code=trust_remote_code)
    return load_tokenizer(source, trust_remote_code=trust_remote_code)


def _release(big: bool = True) -> None:
    """Give freed weights back (call after the last reference is deleted). A full ``gc.collect`` costs about
    half a second, so it is skipped for small models, whose memory does not matter."""
    if big:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _attach(model: Any, adapter: _Adapter, new_vocab: int | None) -> Any:
    from peft import PeftModel

    if new_vocab:
        model.resize_token_embeddings(new_vocab)
    try:
        return PeftModel.from_pretrained(model, str(adapter.load_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MergeError(f"peft could not load the adapter from {adapter.load_dir}: {e}") from None


def merge_adapter(
    base: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "bfloat16",
    base_source: str = "original",
    device: str = "auto",
    *,
    gguf_file: str | None = None,
    quantization: str | None = "nf4",
    compute_dtype: str = "auto",
    double_quant: bool = True,
    eval_texts: Sequence[str] | None = None,
    eval_source: str | None = None,
    tolerance: float = 1e-2,
    max_eval_tokens: int = 2048,
    max_eval_len: int = 512,
    compare_tokens: int = 256,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a LoRA adapter into a 16-bit copy of its base, verify the result, save it; return ``output_dir``.

    Args:
        base: the base model the adapter was trained on: a directory, a ``.gguf`` file, a directory with one
            GGUF file, or a hub id.
        adapter_dir: a peft ``save_pretrained`` directory (``continued_pretrain`` or ``sft`` output).
        output_dir: where the merged model goes; it loads with plain ``AutoModelForCausalLM``.
        dtype: dtype of the merged weights: 'bfloat16', 'float16' or 'float32'.
        base_source: 'original' (the 16-bit checkpoint) or 'dequantized' (the 4-bit weights the adapter was
            trained on, dequantized: reproduces the trained model, quantization error included).
        device: 'auto', 'cpu' or 'cuda[:N]'.
        gguf_file: GGUF file name inside ``base``.
        quantization: how the base was quantized in training ('nf4', 'fp4', 'int8' or None); used for the
            "as trained" numbers and for ``base_source='dequantized'``.
        compute_dtype, double_quant: the training-time settings of the quantized base.
        eval_texts: held-out texts for the check (the run's eval split when known). None: a few generic
            sentences, which still catch a broken merge but say little about domain quality.
        eval_source: how to describe ``eval_texts`` in the report.
        tolerance: largest allowed max |logit difference| between the adapter on the 16-bit base and the
            merged model, as a fraction of the largest |logit| (at least 1).
        max_eval_tokens, max_eval_len: how much held-out text is scored, and the longest sequence.
        compare_tokens: positions whose full logits are compared.
        max_shard_size: safetensors shard size of the merged model.
        overwrite: replace an existing, non-empty ``output_dir``.
        trust_remote_code: run code from the model repository.

    Raises:
        MergeError: corrupted or mismatched adapter, too little disk space, or a merge that does not verify
            (the unverified folder is left at ``OUTPUT.partial`` with its report).

    Example::

        merge_adapter("models/llama-3-8b", "runs/demo/adapter", "runs/demo/merged", dtype="bfloat16")
    """
    problems = []
    if dtype not in _DTYPES:
        problems.append(f"dtype = {dtype!r}: use 'bfloat16', 'float16' or 'float32'")
    if base_source not in ("original", "dequantized"):
        problems.append(f"base_source = {base_source!r}: use 'original' or 'dequantized'")
    quantization = None if quantization in (None, "none") else quantization
    if base_source == "dequantized" and quantization is None:
        problems.append("base_source = 'dequantized' needs the quantization the adapter was trained with")
    if not tolerance > 0:
        problems.append(f"tolerance = {tolerance!r}: must be > 0")
    if problems:
        raise ConfigError(problems, header="cannot merge")
    torch_dtype = _DTYPES[dtype]
    dev = resolve_device(device)
    adapter_dir = Path(adapter_dir)
    out = Path(output_dir)
    staging = out.with_name(out.name + ".partial")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(
            f"{out} exists and is not empty; choose another output directory or pass overwrite=True"
        )

    # --- setup: check everything that can be checked before any weights are loaded --------------------------
    source = resolve_model_source(base, gguf_file)
    with tempfile.TemporaryDirectory(prefix="lora_dapt_adapter_") as tmp:
        adapter = read_adapter(adapter_dir, staging_dir=tmp)
        base_config, meta = _meta_model(source, trust_remote_code)
        notes = _check_base_name(adapter, adapter_dir, str(base), base_config, str(source))
        new_vocab = _check_shapes(adapter, adapter_dir, str(base), meta)
        need = _estimate_bytes(meta, torch_dtype, new_vocab)
        big = need > 2**30
        del meta
        free = _free_bytes(out.parent)
        if free < need * 1.05 + 64 * 2**20:
            raise MergeError(
                f"not enough disk space for the merged model in {out.parent}: about {need / 2**30:.2f} GiB "
                f"needed ({dtype}), {free / 2**30:.2f} GiB free. Free some space or choose another output_dir."
            )
        tokenizer = _tokenizer_for(adapter_dir, source, trust_remote_code)
        if new_vocab and len(tokenizer) != new_vocab:
            raise MergeError(
                f"the adapter's embeddings have {new_vocab} rows but its tokenizer has {len(tokenizer)} tokens; "
                f"the base {base!s} has {base_config.vocab_size}. Save the tokenizer used in training with the adapter."
            )
        texts = list(eval_texts) if eval_texts else list(_FALLBACK_TEXTS)
        if not eval_texts:
            eval_source = "built-in generic sentences (no held-out texts given)"
            log.warning(
                "merge check uses generic sentences: pass eval_texts (the run's eval split) for domain numbers"
            )
        batches = _eval_ids(tokenizer, texts, max_eval_tokens, max_eval_len)
        if not batches:
            raise MergeError("the held-out texts are empty after tokenization; give longer eval_texts")
        losses: dict[str, LossResult | None] = {}

        # --- (a) the adapter on the quantized base, as trained; (b) the adapter on the 16-bit base ------------
        # bitsandbytes repacks 4-bit weights in place for its CPU kernel on the first no-grad forward pass,
        # after which dequantize_4bit returns garbage. So with base_source='dequantized' the 4-bit weights are
        # copied into the 16-bit model before the 4-bit model runs; with 'original' the 4-bit model runs and is
        # freed first, so the two are never in memory together.
        logits_a = None
        model4 = None
        if quantization is not None:
            model4, _ = load_base_model(
                source,
                quantization,
                compute_dtype,
                double_quant,
                device=device,
                trust_remote_code=trust_remote_code,
            )
            if base_source == "original":
                losses["adapter_4bit_as_trained"], logits_a = _evaluate(
                    _attach(model4, adapter, new_vocab), batches, compare_tokens
                )
                model4 = None
                _release(big)

        model16, _ = load_base_model(
            source,
            None,
            dtype,
            device=str(dev),
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
        )
        peft16 = _attach(model16, adapter, new_vocab)
        del model16
        with peft16.disable_adapter():
            _, logits_base = _evaluate(peft16, batches, compare_tokens)
        losses["adapter_16bit_original"], logits_b = _evaluate(peft16, batches, compare_tokens)
        if model4 is not None:  # base_source == "dequantized"
            n = _load_dequantized(peft16, _quantized_linears(model4))
            log.info("replaced %d layers with their dequantized %s weights", n, quantization)
            losses["adapter_16bit_dequantized"], logits_b = _evaluate(peft16, batches, compare_tokens)
            losses["adapter_4bit_as_trained"], logits_a = _evaluate(
                _attach(model4, adapter, new_vocab), batches, compare_tokens
            )
            model4 = None
            _release(big)
        adapter_effect = _max_diff(logits_b, logits_base)
        del logits_base

        # --- merge (peft, in place) and save -----------------------------------------------------------------
        try:
            merged = peft16.merge_and_unload(safe_merge=True)
        except ValueError as e:
            raise MergeError(f"merging {adapter_dir} failed: {e}") from None
        del peft16
        for name, p in merged.named_parameters():
            if not torch.isfinite(p).all():
                raise MergeError(
                    f"merged weight {name} has NaN/inf values; the adapter in {adapter_dir} is broken"
                )
        tied = bool(getattr(merged.config, "tie_word_embeddings", False))
        if tied:
            inp, head = merged.get_input_embeddings(), merged.get_output_embeddings()
            if inp.weight.data_ptr() != head.weight.data_ptr():
                if torch.equal(inp.weight, head.weight):
                    head.weight = inp.weight
                else:
                    # An adapter that trained the two copies apart: keep what was trained, untied.
                    merged.config.tie_word_embeddings = False
                    tied = False
                    notes.append(
                        "the base ties embeddings and head, the adapter trained them apart: saved untied"
                    )
        merged.config.pad_token_id = tokenizer.pad_token_id
        if getattr(merged, "generation_config", None) is not None:
            merged.generation_config.pad_token_id = tokenizer.pad_token_id
        if staging.exists():
            shutil.rmtree(staging)
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        del merged
        _release(big)

    # --- verify: reload the saved folder without peft ---------------------------------------------------------
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(
        str(staging), dtype=torch_dtype, output_loading_info=True, trust_remote_code=trust_remote_code
    )
    reloaded.to(dev)
    missing = [k for k in info.get("missing_keys", []) if k]
    unexpected = [k for k in info.get("unexpected_keys", []) if k]
    losses["merged"], logits_c = _evaluate(reloaded, batches, compare_tokens)
    reload_tied = (
        reloaded.get_input_embeddings().weight.data_ptr()
        == reloaded.get_output_embeddings().weight.data_ptr()
    )
    del reloaded
    _release(big)

    diff = _max_diff(logits_b, logits_c)
    scale = max(1.0, float(logits_b.abs().max()))
    if missing or unexpected:
        notes.append(
            f"reloading the merged model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    if tied and not reload_tied:
        notes.append("the merged model should tie embeddings and head, but the reloaded one does not")
    ok = diff <= tolerance * scale and not (missing or unexpected) and (reload_tied or not tied)
    if diff > tolerance * scale:
        notes.append(
            f"merged logits differ from the adapter's by up to {diff:.4g} (> {tolerance:g} x {scale:.3g}); "
            + (
                "bf16/fp16 rounding of the merged weights can do this: try dtype='float32' or a larger tolerance"
                if dtype != "float32" and diff < 0.5 * adapter_effect
                else "the merge did not keep the adapter"
            )
        )

    closer, lower, advice = _advice(losses, base_source, quantization)
    report = MergeReport(
        passed=ok,
        base=str(base),
        resolved_base=str(source),
        adapter_dir=str(adapter_dir),
        output_dir=str(out if ok else staging),
        dtype=dtype,
        base_source=base_source,
        trained_quantization=quantization or "none",
        eval_source=eval_source or "given texts",
        eval_texts=len(batches),
        eval_tokens=sum(len(b) - 1 for b in batches),
        losses=losses,
        max_abs_logit_diff=diff,
        logit_scale=scale,
        tolerance=tolerance,
        adapter_effect=adapter_effect,
        max_abs_logit_diff_4bit_vs_16bit=None if logits_a is None else _max_diff(logits_a, logits_b),
        trained_embeddings=adapter.trained_embeddings,
        tied_embeddings=tied and reload_tied,
        closer_to_trained=closer,
        lower_loss=lower,
        advice=advice,
        problems=notes,
    )
    (staging / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    print(report.summary())
    if not ok:
        raise MergeError(
            f"the merged model does not reproduce the adapter; NOT saved to {out}. Inspect {staging} and its "
            f"{REPORT_NAME}:\n" + "\n".join(f"  - {p}" for p in notes)
        )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def _advice(
    losses: dict[str, LossResult | None], base_source: str, quantization: str | None
) -> tuple[str | None, str | None, str]:
    """Which base_source is closer to the trained model, which scores better, and a sentence saying so.

    The adapter on the dequantized base computes what the 4-bit forward pass computed, so when it was not
    measured the 4-bit loss (a) stands in for it.
    """
    trained = losses.get("adapter_4bit_as_trained")
    original = losses.get("adapter_16bit_original")
    deq = losses.get("adapter_16bit_dequantized") or trained
    if trained is None or original is None or deq is None:
        return None, None, "the adapter was trained on a 16-bit base: base_source does not matter"
    d_orig = abs(original.loss - trained.loss)
    d_deq = abs(deq.loss - trained.loss)
    closer = "dequantized" if d_deq <= d_orig else "original"
    lower = "dequantized" if deq.loss <= original.loss else "original"
    advice = (
        f"as trained ({quantization}): loss {trained.loss:.4f}; base_source='dequantized' gives "
        f"{deq.loss:.4f}, 'original' gives {original.loss:.4f}. '{closer}' is closer to what was trained, "
        f"'{lower}' scores better on this text (merged with '{base_source}')."
    )
    return closer, lower, advice


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"cannot read {path}: {e}") from None


def merge_run(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    dtype: str | None = None,
    base_source: str | None = None,
    device: str | None = None,
    *,
    tolerance: float | None = None,
    overwrite: bool = False,
    eval_texts: Sequence[str] | None = None,
) -> Path:
    """Merge the adapter of a training run directory (DAPT or SFT); what ``lora-dapt merge RUN_DIR`` calls.

    Reads ``RUN_DIR/run_info.json`` (the base model as loaded in training; falls back to the ``model`` section
    of ``RUN_DIR/config.yaml``), the ``merge`` section of ``config.yaml`` for defaults, ``RUN_DIR/adapter/`` and
    ``RUN_DIR/eval_texts.json`` (the held-out split, used for the check). Arguments left as None take the run's
    ``merge`` settings; the output defaults to ``RUN_DIR/merged``.

    Example::

        merge_run("runs/demo", dtype="bfloat16")   # -> Path("runs/demo/merged")
    """
    import yaml

    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{run_dir} is not a finished run directory: {adapter_dir}/adapter_config.json is missing"
        )
    cfg_path = run_dir / "config.yaml"
    data: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise MergeError(f"{cfg_path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise MergeError(f"{cfg_path}: expected a mapping of sections")
    # The model and merge sections are shared by DAPT and SFT runs; read them typed, so a typo is an error.
    model_cfg = ModelConfig.from_dict(data.get("model") or {})
    merge_cfg = MergeConfig.from_dict(data.get("merge") or {})

    info_path = run_dir / "run_info.json"
    base_info: dict[str, Any] = {}
    if info_path.is_file():
        info = _read_json(info_path)
        base_info = info.get("base_model") or {} if isinstance(info, dict) else {}
    name = base_info.get("name_or_path") or model_cfg.name_or_path
    if not name:
        raise MergeError(
            f"{run_dir}: no base model recorded (run_info.json base_model or config.yaml model.name_or_path)"
        )
    gguf = base_info["gguf_file"] if "gguf_file" in base_info else model_cfg.gguf_file
    resolved = base_info.get("resolved")
    base: str | Path = name
    if resolved and Path(resolved).is_dir() and not Path(name).exists():
        # The original moved away; its resolved copy (e.g. the dequantized GGUF checkpoint) is still here.
        base, gguf = resolved, None
    # run_info records what training actually used (e.g. compute dtype 'auto' resolved to 'bfloat16').
    quant = base_info["quantization"] if "quantization" in base_info else model_cfg.quantization
    compute = base_info.get("compute_dtype") or model_cfg.compute_dtype

    texts = eval_texts
    source_note = "given texts"
    texts_path = run_dir / "eval_texts.json"
    if texts is None and texts_path.is_file():
        loaded = _read_json(texts_path)
        if not isinstance(loaded, list) or not all(isinstance(t, str) for t in loaded):
            raise MergeError(f"{texts_path}: expected a JSON list of strings")
        texts, source_note = loaded, f"the run's eval split ({texts_path.name})"

    return merge_adapter(
        base,
        adapter_dir,
        output_dir or merge_cfg.output_dir or run_dir / "merged",
        dtype=dtype or merge_cfg.dtype,
        base_source=base_source or merge_cfg.base_source,
        device=device or model_cfg.device,
        gguf_file=gguf,
        quantization=quant,
        compute_dtype=compute,
        double_quant=model_cfg.double_quant,
        eval_texts=texts,
        eval_source=source_note,
        tolerance=tolerance if tolerance is not None else merge_cfg.tolerance,
        overwrite=overwrite,
        trust_remote_code=model_cfg.trust_remote_code,
    )
