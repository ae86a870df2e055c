"""Hostile input: random config dicts and random corpus files give the library's own errors, nothing else."""

from __future__ import annotations

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_dapt import DataConfig, RunConfig
from lora_dapt.config import SECTIONS
from lora_dapt.errors import ConfigError, DataError, LoraDaptError

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.text(max_size=5), max_size=3),
)
KEYS = st.sampled_from(sorted({f for cls in SECTIONS.values() for f in cls.__dataclass_fields__} | {"x", ""}))
SECTION = st.dictionaries(
    KEYS, st.one_of(SCALARS, st.dictionaries(st.text(max_size=4), SCALARS, max_size=2)), max_size=6
)
CONFIG = st.dictionaries(st.sampled_from([*SECTIONS, "extra"]), st.one_of(SECTION, SCALARS), max_size=5)


@settings(max_examples=300, deadline=None)
@given(CONFIG)
def test_config_dicts_raise_only_config_errors(data):
    try:
        cfg = RunConfig.from_dict(data)
    except ConfigError as e:
        text = str(e)
        assert text.startswith("invalid configuration") and e.problems
        assert all(isinstance(p, str) and p for p in e.problems)
        return
    # accepted: it must survive a YAML round trip unchanged (what a run directory's config.yaml relies on)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.lists(
        st.tuples(
            st.sampled_from([".txt", ".md", ".jsonl", ".json", ".csv", ".parquet", ".bin", ".rst", ""]),
            st.one_of(st.binary(max_size=300), st.text(alphabet=string.printable + "é✓\x00", max_size=300)),
        ),
        min_size=1,
        max_size=5,
    ),
    seq_len=st.integers(2, 64),
)
def test_random_corpus_files_never_crash(tiny_tokenizer, tmp_path_factory, files, seq_len):
    from lora_dapt.data.corpus import prepare_corpus

    d = tmp_path_factory.mktemp("fuzz")
    for i, (ext, content) in enumerate(files):
        p = d / f"f{i}{ext}"
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
    cfg = DataConfig(sources=[str(d)], seq_len=seq_len, eval_fraction=0.0, cache_dir=str(d / ".cache"))
    try:
        corpus = prepare_corpus([str(d)], tiny_tokenizer, cfg)
    except DataError as e:
        assert str(e)
        return
    except LoraDaptError as e:  # pragma: no cover - any other library error must still read well
        assert str(e)
        return
    assert len(corpus.train) > 0
    assert all(len(r) == seq_len for r in corpus.train["input_ids"])
