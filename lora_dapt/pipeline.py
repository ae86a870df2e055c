"""``run``: the whole pipeline for one :class:`RunConfig` (what `lora-dapt train CONFIG.yaml` calls).

The only place that takes the whole RunConfig; every stage below gets its own small config.
Order: tokenizer -> corpus (fails fast on bad data, before the slow model load) -> 4-bit base -> LoRA ->
continued pre-training with before/after evaluation -> optional merge (only of a run that finished and
received no signal: a Ctrl-C during the evaluation after training asked for no more work).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .config import RunConfig

if TYPE_CHECKING:
    from .train.pretrain import TrainResult

log = logging.getLogger("lora_dapt")


def run(config: RunConfig) -> TrainResult:
    """Run continued pre-training as described by ``config`` and return the :class:`TrainResult`.

    Example::

        import lora_dapt as ld
        result = ld.run(ld.RunConfig.from_yaml("examples/gpu_8b_qlora.yaml"))
    """
    from transformers import set_seed

    from .data.corpus import prepare_corpus
    from .evaluate.forgetting import general_texts
    from .model.load import load_base_model_from, tokenizer_before_load
    from .model.lora import apply_lora
    from .train.pretrain import continued_pretrain
    from .train.trackers import check_trackers

    config.check()
    m = config.model
    # every input fails here, before the slow model load (or a GGUF's dequantization): the tokenizer,
    # data.seq_len against the model's context (its config), every source list, the trackers' packages
    check_trackers(config.train.report_to)
    tokenizer = tokenizer_before_load(m, config.data.seq_len)
    adapter = config.adapter
    if adapter.new_tokens:  # domain tokens first: the corpus is tokenized with them
        from .data.vocab import extend_vocabulary

        vocab = extend_vocabulary(
            tokenizer,
            config.data.sources,
            adapter.new_tokens,
            adapter.new_tokens_min_frequency,
            config=config.data,
        )
        log.info("%s", vocab.summary())
        tokenizer = vocab.tokenizer
    ev = config.eval
    general = general_texts(ev.general_sources) if ev.enabled and ev.general and ev.general_sources else None
    corpus = prepare_corpus(config.data.sources, tokenizer, config.data)
    log.info("corpus ready:\n%s", _summary(corpus))
    loaded = load_base_model_from(m)
    set_seed(config.train.seed)  # the LoRA init draws from the global generators
    new_ids = None
    if adapter.new_tokens:  # grow embeddings and head (rows: the mean of their old sub-tokens)
        from .model.vocab import add_token_rows

        new_ids = add_token_rows(loaded.model, loaded.tokenizer, tokenizer).token_ids
    model = apply_lora(
        loaded.model,
        config.adapter,
        seq_len=config.data.seq_len,
        batch_size=config.train.batch_size,
        trainable_tokens=new_ids,
    )
    result = continued_pretrain(
        model,
        tokenizer if new_ids is not None else loaded.tokenizer,  # saved with the adapter
        corpus,
        config.train,
        eval_config=ev,
        run_config=config,
        general_texts=general,
        model_source=loaded.source,
    )
    del loaded
    if config.merge.enabled and result.stopped is None and result.signal is None:
        from .export.merge import merge_run

        del model  # the merge reloads the base in 16-bit; free the 4-bit copy first
        merge_run(
            result.output_dir,
            output_dir=config.merge.output_dir,
            dtype=config.merge.dtype,
            log_to_trackers=True,  # the merge's figures into the run's tracker runs, at its last step
        )
    return result


def _summary(corpus: Any) -> str:
    stats = getattr(corpus, "stats", None)
    if stats is None:
        return "(no stats)"
    return stats.summary() if hasattr(stats, "summary") else str(stats)
