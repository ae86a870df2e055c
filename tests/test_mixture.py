"""data.mixture: components at stated token fractions, planned and achieved; the replay short form; shortfalls."""

from __future__ import annotations

import doctest
import json
import logging
import math

import pytest

from lora_dapt.config import DataConfig, RunConfig
from lora_dapt.data import mixture
from lora_dapt.data.corpus import prepare_corpus
from lora_dapt.data.stats import ComponentStats
from lora_dapt.errors import ConfigError

from .conftest import make_text

SEQ = 64


def texts(n: int, words: int, seed: int) -> list[str]:
    return [make_text(words + 3 * i, seed=seed + i) for i in range(n)]


def tokens_of(tok, docs: list[str]) -> int:
    """Tokens a list of documents packs to, counted here (BOS + text + EOS each, as the tiny tokenizer adds)."""
    return sum(len(tok(t, add_special_tokens=False).input_ids) + 2 for t in docs)


def cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def write_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))


def test_doctests():
    assert doctest.testmod(mixture).failed == 0


def test_three_sources_at_their_fractions(tmp_path, tiny_tokenizer):
    law, med, general = texts(20, 40, 100), texts(60, 40, 2000), texts(80, 40, 5000)
    write_jsonl(tmp_path / "general" / "g.jsonl", general)
    mix = [
        {"name": "law", "sources": [law], "weight": 5},
        {"name": "medicine", "sources": [med], "weight": 3},
        {"name": "general", "sources": [{"hf": str(tmp_path / "general"), "streaming": True}], "weight": 2},
    ]
    corpus = prepare_corpus(None, tiny_tokenizer, cfg(tmp_path, mixture=mix))
    s = corpus.stats
    law_tokens = tokens_of(tiny_tokenizer, law)
    assert [c.name for c in s.mixture] == ["law", "medicine", "general"]
    assert [c.weight for c in s.mixture] == [0.5, 0.3, 0.2]
    # the domain holds the fewest tokens for its weight: used whole, the others sampled to their share
    assert s.mixture[0].tokens == law_tokens and s.mixture[0].limiting
    assert s.mixture[1].tokens == math.ceil(law_tokens * 0.3 / 0.5)
    assert s.mixture[2].tokens == math.ceil(law_tokens * 0.2 / 0.5)
    assert s.train_tokens == sum(c.tokens for c in s.mixture)
    assert s.replay_tokens == s.mixture[1].tokens + s.mixture[2].tokens
    for c in s.mixture:  # achieved within one block of planned
        assert abs(c.tokens - c.weight * s.train_tokens) <= SEQ
        assert c.fraction == pytest.approx(c.tokens / s.train_tokens)
    # every token is in the blocks: the train blocks hold train_tokens plus padding
    assert len(corpus.train) * SEQ == s.train_tokens + s.padding_tokens
    # medicine's 60 documents were all tokenized (its share needs most of them): what it held is known
    assert s.mixture[1].available_tokens == tokens_of(tiny_tokenizer, med)
    assert s.mixture[1].unused_tokens == s.mixture[1].available_tokens - s.mixture[1].tokens > 0
    assert "  mix medicine: " in s.summary() and "(planned 30.0%)" in s.summary()
    # cached: the component stats come back as ComponentStats, the same numbers
    again = prepare_corpus(None, tiny_tokenizer, cfg(tmp_path, mixture=mix))
    assert again.stats.cached and isinstance(again.stats.mixture[2], ComponentStats)
    assert [c.tokens for c in again.stats.mixture] == [c.tokens for c in s.mixture]


def test_a_short_component_is_used_whole_and_limits_the_others(tmp_path, tiny_tokenizer, caplog):
    domain, small = texts(30, 40, 100), texts(3, 30, 9000)
    mix = [
        {"name": "domain", "sources": [domain], "weight": 0.6},
        {"name": "general", "sources": [small], "weight": 0.4},
    ]
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        s = prepare_corpus(None, tiny_tokenizer, cfg(tmp_path, mixture=mix)).stats
    small_tokens, domain_tokens = tokens_of(tiny_tokenizer, small), tokens_of(tiny_tokenizer, domain)
    general = s.mixture[1]
    assert general.limiting and not s.mixture[0].limiting
    assert general.tokens == general.available_tokens == small_tokens and general.documents == 3
    assert s.mixture[0].tokens == math.ceil(small_tokens * 0.6 / 0.4)
    assert s.mixture[0].available_tokens == domain_tokens
    assert s.mixture[0].unused_tokens == domain_tokens - s.mixture[0].tokens > 0
    assert abs(general.tokens - 0.4 * s.train_tokens) <= SEQ
    assert f"mixture: general holds {small_tokens} tokens, fewer than its share 40.0% needs" in caplog.text
    assert f"domain {s.mixture[0].unused_tokens:,}" in caplog.text


def test_replay_short_form_is_the_two_component_mixture(tmp_path, tiny_tokenizer):
    domain, general = texts(16, 40, 100), texts(40, 60, 5000)
    short = prepare_corpus(
        [domain],
        tiny_tokenizer,
        cfg(tmp_path, replay_fraction=0.25, replay_sources=["unused"]),
        replay_sources=[general],
    )
    mix = [
        {"name": "domain", "sources": [domain], "weight": 0.75},
        {"name": "replay", "sources": [general], "weight": 0.25},
    ]
    full = prepare_corpus(None, tiny_tokenizer, cfg(tmp_path, mixture=mix), use_cache=False)
    assert short.train["input_ids"] == full.train["input_ids"]
    assert (
        short.stats.replay_tokens
        == full.stats.replay_tokens
        == math.ceil(tokens_of(tiny_tokenizer, domain) / 3)
    )
    assert [(c.name, c.tokens) for c in short.stats.mixture] == [
        (c.name, c.tokens) for c in full.stats.mixture
    ]


def test_eval_comes_from_the_first_component_and_never_leaks(tmp_path, tiny_tokenizer):
    domain, other = texts(12, 40, 100), texts(30, 40, 7000)
    mix = [
        {"name": "domain", "sources": [domain], "weight": 1},
        {"name": "other", "sources": [other + domain], "weight": 1},  # holds every domain document too
    ]
    corpus = prepare_corpus(None, tiny_tokenizer, cfg(tmp_path, mixture=mix, eval_fraction=0.25))
    s = corpus.stats
    assert s.eval_documents == 3 and len(corpus.eval_documents) == 3
    assert set(corpus.eval_documents) <= set(domain)
    # the other component's copies of the eval documents are dropped, named as such
    assert s.mixture[1].dropped == {"in_eval": 3}
    assert s.mixture[1].documents_read == 42
    assert s.eval_tokens == tokens_of(tiny_tokenizer, corpus.eval_documents)


def test_mixture_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError) as err:
        DataConfig(
            mixture=[
                {"name": "law", "sources": ["law/"], "weight": 2, "wieght": 1},
                {"name": "law", "sources": [], "weight": -1},
                {"sources": [{"hf": "x", "splt": "train"}], "weight": True},
            ]
        )
    assert err.value.problems == [
        "data.mixture[0].wieght: unknown key; did you mean 'weight'?",
        "data.mixture[1].name = 'law': the name of component 0 too; names must differ",
        "data.mixture[1].weight = -1: must be a number > 0 (weights are relative: 0.7 and 0.3, or 7 and 3)",
        "data.mixture[1].sources = []: give a list of paths, globs, directories or datasets specs",
        "data.mixture[2].name = None: give the component a name (e.g. 'law', 'general')",
        "data.mixture[2].weight = True: must be a number > 0 (weights are relative: 0.7 and 0.3, or 7 and 3)",
        "data.mixture[2].sources[0].splt: unknown key; did you mean 'split'?",
    ]
    with pytest.raises(ConfigError) as err:  # a component that is not a mapping: the type check says so
        DataConfig(mixture=["general/"])
    assert err.value.problems == ["data.mixture = ['general/']: expected list of dict"]
    with pytest.raises(ConfigError, match="put the domain sources in the first mixture component"):
        DataConfig(sources=["a/"], mixture=[{"name": "a", "sources": ["b/"], "weight": 1}])
    # a config with a mixture and no data.sources is complete
    run = RunConfig.from_dict(
        {"model": {"name_or_path": "m"}, "data": {"mixture": [{"name": "a", "sources": "law/", "weight": 1}]}}
    )
    assert run.problems() == [] and run.data.mixture[0]["sources"] == "law/"
