"""Datasets specs as sources ({hf: ...}: save_to_disk, data files, streaming) and code/markup files as text."""

from __future__ import annotations

import doctest
import json

import datasets
import pytest

from lora_dapt.config import DataConfig, RunConfig
from lora_dapt.data import formats, specs
from lora_dapt.data.corpus import prepare_corpus
from lora_dapt.data.sources import read_text_sources
from lora_dapt.errors import ConfigError, DataError

from .conftest import make_text

TEXTS = [make_text(30 + 11 * i, seed=300 + i) for i in range(14)]


def cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("seq_len", 64)
    kw.setdefault("eval_fraction", 0.2)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(**kw)


def write_jsonl(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))


def same_corpus(a, b):
    """The same tokens, blocks and split (sources are named differently, so not the example names)."""
    for k in (
        "documents_read",
        "train_documents",
        "eval_documents",
        "train_tokens",
        "eval_tokens",
        "characters",
    ):
        assert getattr(a.stats, k) == getattr(b.stats, k), k
    assert a.train["input_ids"] == b.train["input_ids"]
    assert a.eval["input_ids"] == b.eval["input_ids"]
    assert a.eval_documents == b.eval_documents


def test_doctests():
    for module in (specs, formats):
        assert doctest.testmod(module).failed == 0


def test_save_to_disk_directory_equals_the_same_texts(tmp_path, tiny_tokenizer):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(saved))
    ref = prepare_corpus([TEXTS], tiny_tokenizer, cfg(tmp_path))
    got = prepare_corpus([{"hf": str(saved)}], tiny_tokenizer, cfg(tmp_path))
    same_corpus(got, ref)
    assert ref.stats.documents_read == 14 and got.stats.train_tokens > 0
    assert read_text_sources({"hf": str(saved)}) == TEXTS  # what eval.general_sources and `evaluate` read
    # a DatasetDict saved to disk: the spec's split; a missing split is named with the ones there are
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(dd))
    same_corpus(prepare_corpus({"hf": str(dd)}, tiny_tokenizer, cfg(tmp_path)), ref)
    with pytest.raises(DataError, match=r"has no split 'test' \(it has train\): set split"):
        prepare_corpus({"hf": str(dd), "split": "test"}, tiny_tokenizer, cfg(tmp_path))


def test_data_files_and_directories_through_load_dataset(tmp_path, tiny_tokenizer):
    jl = tmp_path / "jl" / "part.jsonl"
    write_jsonl(jl, TEXTS)
    ours = prepare_corpus([str(jl)], tiny_tokenizer, cfg(tmp_path))  # our own JSON Lines reader
    by_builder = prepare_corpus(
        [{"hf": "json", "data_files": str(jl)}], tiny_tokenizer, cfg(tmp_path, cache_dir=str(tmp_path / "c2"))
    )
    by_dir = prepare_corpus([{"hf": str(jl.parent)}], tiny_tokenizer, cfg(tmp_path))
    same_corpus(by_builder, ours)
    same_corpus(by_dir, ours)
    # parquet directory, text in another column (the spec's text_field)
    pq = tmp_path / "pq"
    pq.mkdir()
    datasets.Dataset.from_dict({"content": TEXTS}).to_parquet(str(pq / "data.parquet"))
    par = prepare_corpus([{"hf": str(pq), "text_field": "content"}], tiny_tokenizer, cfg(tmp_path))
    same_corpus(par, ours)
    # the wrong column is reported by name, with the columns there are
    with pytest.raises(DataError, match="no training documents") as err:
        prepare_corpus([{"hf": str(pq)}], tiny_tokenizer, cfg(tmp_path))
    assert "no column 'text' (columns: content)" in str(err.value)


def test_streaming_source_accounts_for_every_token_and_is_cached(tmp_path, tiny_tokenizer):
    d = tmp_path / "stream"
    write_jsonl(d / "a.jsonl", TEXTS[:8])
    write_jsonl(d / "b.jsonl", TEXTS[8:] + [""])  # an empty row: dropped and counted, streamed or not
    plain = prepare_corpus([{"hf": str(d)}], tiny_tokenizer, cfg(tmp_path))
    streamed = prepare_corpus([{"hf": str(d), "streaming": True}], tiny_tokenizer, cfg(tmp_path))
    same_corpus(streamed, plain)
    assert streamed.stats.dropped["empty"] == plain.stats.dropped["empty"] == 1
    assert streamed.stats.documents_read == 15 and not streamed.stats.cached
    again = prepare_corpus([{"hf": str(d), "streaming": True}], tiny_tokenizer, cfg(tmp_path))
    assert again.stats.cached and again.train["input_ids"] == streamed.train["input_ids"]
    # a changed file changes the key: prepared again, with the new row
    write_jsonl(d / "b.jsonl", TEXTS[8:] + ["", make_text(50, seed=999)])
    changed = prepare_corpus([{"hf": str(d), "streaming": True}], tiny_tokenizer, cfg(tmp_path))
    assert not changed.stats.cached and changed.stats.documents_read == 16


def test_hub_name_offline_is_a_clear_error(tmp_path, tiny_tokenizer, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        prepare_corpus([{"hf": "someone/no-such-dataset"}], tiny_tokenizer, cfg(tmp_path))
    msg = str(err.value)
    assert msg.startswith("hf:someone/no-such-dataset[train]: cannot reach 'someone/no-such-dataset' on the")
    assert "A hub name needs the network" in msg and "point hf at a local directory" in msg


def test_malformed_specs_name_the_key_and_the_fix():
    with pytest.raises(ConfigError) as err:  # neither a path nor a mapping: the type check says so
        DataConfig(sources=["notes/", 5])
    assert err.value.problems == ["data.sources = ['notes/', 5]: expected list of str | dict"]
    with pytest.raises(ConfigError) as err:
        DataConfig(
            sources=[{"hf": "data/", "splt": "train"}, {"split": "train"}],
            eval_sources=[{"hf": "x", "streaming": "yes", "data_files": 3}],
        )
    assert err.value.problems == [
        "data.sources[0].splt: unknown key; did you mean 'split'?",
        "data.sources[1].hf missing: give a hub dataset name, a local directory of data files or a save_to_disk "
        "directory, e.g. {hf: NAME_OR_DIR, split: train, text_field: text, streaming: false}",
        "data.eval_sources[0].data_files = 3: expected a path or glob, a list of them, or a mapping split -> "
        "paths (as datasets.load_dataset takes)",
        "data.eval_sources[0].streaming = 'yes': expected true or false",
    ]
    # a YAML config: a spec beside a path, and a single spec for a list; both round trip
    run = RunConfig.from_dict(
        {"model": {"name_or_path": "m"}, "data": {"sources": ["notes/", {"hf": "d/", "streaming": True}]}}
    )
    assert run.data.sources == ["notes/", {"hf": "d/", "streaming": True}]
    assert RunConfig.from_dict(run.to_dict()).data.sources == run.data.sources
    assert DataConfig(replay_sources={"hf": "wiki/"}).replay_sources == [{"hf": "wiki/"}]


def test_a_directory_of_source_files_is_read(tmp_path, tiny_tokenizer):
    src = tmp_path / "repo"
    (src / "pkg").mkdir(parents=True)
    files = {
        "pkg/a.py": "def add(a, b):\n    return a + b\n",
        "pkg/b.py": "class Pump:\n    valve = 3\n",
        "web/index.html": "<html><body>torque valve</body></html>\n",
        "web/app.js": "function calibrate(v) { return v * 2; }\n",
        "docs/paper.tex": "\\section{Dose} renal clearance\n",
        "conf/settings.toml": "[pump]\nvoltage = 12\n",
        "README.md": "# Pump firmware\n",
        "notes.foo": "a format nobody knows\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (src / "pkg" / "compiled.py").write_bytes(b"\x00\x01binary\x00")  # binary by content, whatever its name
    (src / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    c = cfg(tmp_path, eval_fraction=0.0, dedupe=False)
    s = prepare_corpus([str(src)], tiny_tokenizer, c).stats
    assert s.documents_read == 7 and s.files_read == 8  # 7 text files + compiled.py opened
    assert s.problems == {"binary": 1, "unknown_extension": 2}
    assert sorted(s.examples["unknown_extension"]) == [str(src / "logo.png"), str(src / "notes.foo")]
    assert s.examples["binary"] == [str(src / "pkg" / "compiled.py")]
    # restrict: only .py; the other known formats are counted as excluded, not unknown
    s = prepare_corpus([str(src)], tiny_tokenizer, c.replace(extensions=[".py"])).stats
    assert s.documents_read == 2 and s.problems["excluded_extension"] == 5 and s.problems["binary"] == 1
    # extend: '+.foo' reads .foo as text too; '-.html' skips HTML
    s = prepare_corpus([str(src)], tiny_tokenizer, c.replace(extensions=["+.foo", "-.html"])).stats
    assert s.documents_read == 7 and s.problems["excluded_extension"] == 1
    assert s.examples["excluded_extension"] == [str(src / "web" / "index.html")]
    assert s.problems["unknown_extension"] == 1


def test_extension_rules_are_checked():
    with pytest.raises(ConfigError) as err:
        DataConfig(extensions=[".py", 3])
    assert err.value.problems == ["data.extensions = ['.py', 3]: expected list of str"]
    with pytest.raises(ConfigError) as err:
        DataConfig(extensions=["+", "-py"])
    assert [p.split(" = ")[0] for p in err.value.problems] == ["data.extensions[0]", "data.extensions[1]"]
    with pytest.raises(ConfigError) as err:
        DataConfig(extensions=[".py", "md"])
    assert err.value.problems == [
        "data.extensions[1] = 'md': give an extension with its dot: '.py' (read only the listed extensions), "
        "'+.foo' (read .foo as text besides the default ones) or '-.html' (skip one)"
    ]
    assert formats.readable_extensions([".PY", "+.jsonl"]) == (frozenset({".py"}), frozenset({".jsonl"}))
