"""Hostile inputs (issue 16, defects 7-9): each case ends with an exact outcome, never a hang or a traceback.

Every test runs under a SIGALRM deadline (``deadline`` fixture), so an input that blocks (a FIFO read) or
never ends (a glob through a symlink loop) fails the test instead of blocking CI.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import torch

from lora_dapt import DataConfig, RunConfig
from lora_dapt.config import ModelConfig
from lora_dapt.data.corpus import format_stats, prepare_corpus
from lora_dapt.data.sources import read_text_sources, resolve_path
from lora_dapt.errors import ConfigError, DataError, ModelLoadError
from lora_dapt.evaluate.forgetting import forgetting_report, format_forgetting

from .conftest import make_text

LIMIT_S = 60


class _Deadline(Exception):
    pass


def _expired(signum, frame):  # noqa: ARG001 - a signal handler's signature
    raise _Deadline(f"the case did not finish within {LIMIT_S} s (a hang)")


@pytest.fixture(autouse=True)
def deadline():
    old = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("seq_len", 32)
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def docs(d: Path, n: int, prefix: str = "doc", seed: int = 0) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"{prefix}{i}.txt"
        p.write_text(make_text(30, seed + i))
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 7. inputs that hang: FIFOs, symlink loops; directory symlinks followed
# ---------------------------------------------------------------------------------------------------------------


def test_fifo_in_a_source_directory_is_skipped_counted_and_named(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    docs(d, 2)
    os.mkfifo(d / "pipe.txt")
    c = prepare_corpus([str(d)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    assert s.documents_kept == 2 and s.files_read == 2
    assert s.problems["not_regular"] == 1
    assert s.examples["not_regular"] == [f"{d / 'pipe.txt'} (a FIFO (named pipe): not a regular file)"]
    assert (
        "not regular files: FIFOs, sockets, devices (skipped, never opened): 1 "
        f"(e.g. {d / 'pipe.txt'} (a FIFO (named pipe): not a regular file))"
    ) in format_stats(s).splitlines()


def test_fifo_named_directly_or_by_a_glob_is_skipped(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    (keep,) = docs(d, 1)
    fifo = d / "pipe.txt"
    os.mkfifo(fifo)
    named = resolve_path(fifo)
    assert (named.files, [(s.name, s.kind) for s in named.skipped]) == ([], [(str(fifo), "not_regular")])
    globbed = resolve_path(str(d / "*.txt"))
    assert globbed.files == [str(keep)]
    assert [(s.name, s.kind) for s in globbed.skipped] == [(str(fifo), "not_regular")]
    c = prepare_corpus([str(fifo), str(keep)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    assert c.stats.problems["not_regular"] == 1 and c.stats.documents_kept == 1
    with pytest.raises(DataError, match=r"pipe.txt: a FIFO \(named pipe\): not a regular file"):
        read_text_sources([str(d / "*.txt")])


def test_recursive_glob_through_a_symlinked_parent_ends(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    a, b = docs(d / "a", 1, "a"), docs(d / "b", 1, "b", seed=10)
    os.symlink("..", d / "a" / "up")  # two links back up: glob.glob recursed into 2^40 paths
    os.symlink("..", d / "b" / "up")
    r = resolve_path(str(d / "**" / "*.txt"))
    assert r.files == [str(a[0]), str(b[0])]
    assert sorted((s.name, s.kind) for s in r.skipped) == [
        (str(d / "a" / "up"), "symlink_loop"),
        (str(d / "b" / "up"), "symlink_loop"),
    ]
    c = prepare_corpus([str(d / "**" / "*.txt")], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    assert c.stats.documents_kept == 2 and c.stats.problems["symlink_loop"] == 2


def test_directory_walk_through_a_symlink_loop_reports_it_once(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    docs(d, 2)
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "loop")
    c = prepare_corpus([str(d)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    assert s.documents_kept == 2 and s.files_read == 2
    assert s.problems["symlink_loop"] == 1
    assert s.examples["symlink_loop"] == [
        f"{d / 'sub' / 'loop'} (a symlink to {d.resolve()}, a directory above it)"
    ]


def test_symlinked_directories_are_followed_and_files_reached_twice_read_once(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    docs(d, 1, "own")
    outside = tmp_path / "elsewhere"
    docs(outside, 4, "far", seed=50)
    os.symlink(outside, d / "linked")  # 4 files lost without a count before issue 16
    os.symlink(outside, d / "linked_again")
    os.symlink(d / "own0.txt", d / "same.txt")
    c = prepare_corpus([str(d)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    assert s.files_read == 5 and s.documents_kept == 5 and s.dropped["duplicate"] == 0
    assert s.problems["seen_twice"] == 2
    assert sorted(s.examples["seen_twice"]) == [
        f"{d / 'linked_again'} (the directory {d / 'linked'} again)",
        f"{d / 'same.txt'} (the file {d / 'own0.txt'} again)",
    ]


# ---------------------------------------------------------------------------------------------------------------
# 8. text lost without a count
# ---------------------------------------------------------------------------------------------------------------


def test_invalid_utf8_in_table_files_is_counted_and_named(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b'{"text": "caf\xe9 one two three"}\n{"text": "fine text here"}\n')
    (d / "b.json").write_bytes(b'[{"text": "cr\xe8me four five six"}]')
    (d / "c.csv").write_bytes(b"id,text\n1,br\xfbl\xe9e seven eight\n")
    c = prepare_corpus([str(d)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    assert s.documents_kept == 4
    assert s.problems["undecodable"] == 3
    assert sorted(s.examples["undecodable"]) == [str(d / "a.jsonl"), str(d / "b.json"), str(d / "c.csv")]


def test_utf16_and_utf32_files_with_a_bom_are_decoded(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    d.mkdir()
    t16, t32 = make_text(30, 1), make_text(30, 2)
    (d / "a.txt").write_bytes(codecs.BOM_UTF16_LE + t16.encode("utf-16-le"))
    (d / "b.txt").write_bytes(codecs.BOM_UTF32_BE + t32.encode("utf-32-be"))
    (d / "c.csv").write_bytes(codecs.BOM_UTF16_BE + f"text\n{t16} csv\n".encode("utf-16-be"))
    c = prepare_corpus([str(d)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    assert s.documents_kept == 3 and "binary" not in s.problems and "undecodable" not in s.problems
    assert s.problems["transcoded"] == 3
    assert s.characters == 2 * len(t16) + len(t32) + len(" csv")


def test_csv_unterminated_quote_is_reported_and_later_rows_kept(tmp_path, tiny_tokenizer):
    texts = [make_text(20, 300 + i) for i in range(4)]
    p = tmp_path / "a.csv"
    p.write_text(f'id,text\n1,{texts[0]}\n2,"{texts[1]}\n3,{texts[2]}\n4,{texts[3]}\n')
    c = prepare_corpus([str(p)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    assert s.documents_kept == 3  # rows 1, 3 and 4; before, row 2 swallowed 3 and 4
    assert s.problems["bad_rows"] == 1
    assert s.examples["bad_rows"] == [
        f"{p} (1 rows: {p}:3: not valid CSV (a quoted field never closes); the lines after it were read again)"
    ]


def test_empty_table_files_are_flagged(tmp_path, tiny_tokenizer):
    d = tmp_path / "src"
    docs(d, 1)
    (d / "a.jsonl").write_text("")
    (d / "b.csv").write_text("id,text\n")
    (d / "c.json").write_text("[]")
    (d / "d.json").write_text("")
    c = prepare_corpus([str(d)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    assert s.documents_kept == 1 and "unreadable" not in s.problems
    assert s.problems["empty_file"] == 4
    assert sorted(s.examples["empty_file"]) == [str(d / n) for n in ("a.jsonl", "b.csv", "c.json", "d.json")]


def test_non_json_line_is_reported_as_invalid_json_with_its_line(tmp_path, tiny_tokenizer):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": make_text(20, 1)}) + "\n{not json\n")
    c = prepare_corpus([str(p)], tiny_tokenizer, cfg(tmp_path), use_cache=False)
    s = c.stats
    assert "bad_rows" not in s.problems and s.problems["invalid_json"] == 1
    assert s.examples["invalid_json"][0].startswith(f"{p} (1 rows: {p}:2: not valid JSON (Expecting property")


# ---------------------------------------------------------------------------------------------------------------
# 9. raw tracebacks instead of lora_dapt errors
# ---------------------------------------------------------------------------------------------------------------


def test_config_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"model:\n  name_or_path: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(invalid continuation byte: byte 0xe9"):
        RunConfig.from_yaml(p)


def test_huge_integer_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(
            {"model": {"name_or_path": "m"}, "data": {"sources": ["x"], "seq_len": 10**23 - 1}}
        )
    assert e.value.problems == [
        "data.seq_len = 99999999999999999999999: expected int (at most 9,223,372,036,854,775,807)"
    ]
    with pytest.raises(ConfigError, match=r"data.seq_len = 1000000000: must be <= 16,777,216"):
        DataConfig(seq_len=10**9)


def test_deeply_nested_yaml_and_set_are_config_errors(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("data:\n  sources: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply to read"):
        RunConfig.from_yaml(p)
    ok = tmp_path / "ok.yaml"
    ok.write_text("model: {name_or_path: m}\ndata: {sources: [x]}\n")
    with pytest.raises(ConfigError, match="the value is nested too deeply to read") as e:
        RunConfig.from_yaml(ok, ["data.sources=" + "[" * 3000 + "]" * 3000])
    assert len(str(e.value)) < 400


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
data: {sources: *g, seq_len: *g, seed: *g}
"""


def test_yaml_alias_bomb_gives_a_short_message(tmp_path):
    assert len(BOMB) == 315
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        RunConfig.from_yaml(p)
    assert time.perf_counter() - t0 < 5
    assert len(str(e.value)) < 3000
    assert any(line.startswith("data.seq_len = [[[[") and "...]" in line for line in e.value.problems)


def test_truncated_gguf_is_a_model_load_error(tmp_path, monkeypatch):
    from lora_dapt.model.load import load_base_model

    monkeypatch.setenv("LORA_DAPT_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x01\x00")
    with pytest.raises(
        ModelLoadError, match=r"cannot read GGUF file .*m.gguf \(10 bytes; truncated or not a GGUF"
    ):
        load_base_model(p, quantization=None)


def _copy_model(src: Path, dst: Path, files: tuple[str, ...]) -> Path:
    dst.mkdir()
    for f in files:
        shutil.copy(src / f, dst / f)
    return dst


def test_pickle_only_model_directory_is_refused(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from lora_dapt.model.load import load_base_model

    d = _copy_model(
        tiny_model_dir, tmp_path / "pickled", ("config.json", "tokenizer.json", "tokenizer_config.json")
    )
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), d / "pytorch_model.bin")
    with pytest.raises(
        ModelLoadError, match=r"only as pickle files \(pytorch_model.bin\): lora_dapt does not load"
    ):
        load_base_model(d, quantization=None)


def test_model_directory_without_tokenizer_files(tmp_path, tiny_model_dir):
    from lora_dapt.model.load import load_base_model

    d = _copy_model(tiny_model_dir, tmp_path / "notok", ("config.json", "model.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        load_base_model(d, quantization=None)
    assert "has no tokenizer files (looked for tokenizer.json, tokenizer_config.json, tokenizer.model" in str(
        e.value
    )
    assert "sentencepiece" not in str(e.value)


def test_seq_len_beyond_the_model_context_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer):
    from datasets import Dataset

    from lora_dapt import AdapterConfig, TrainConfig, apply_lora, continued_pretrain, load_base_model
    from lora_dapt.model.load import tokenizer_before_load

    with pytest.raises(ConfigError, match=r"data.seq_len = 1,024: longer than the context .*= 512\)"):
        tokenizer_before_load(ModelConfig(name_or_path=str(tiny_model_dir)), 1024)
    model, tok = load_base_model(tiny_model_dir, quantization=None, device="cpu")
    model = apply_lora(model, AdapterConfig(r=2, alpha=4, target_modules=["q_proj"]))
    row = {"input_ids": [5] * 600, "position_ids": list(range(600)), "labels": [5] * 600}
    with pytest.raises(
        ConfigError, match=r"seq_len \(of the training blocks\) = 600: longer than the context"
    ):
        continued_pretrain(
            model, tok, Dataset.from_list([row]), TrainConfig(output_dir=str(tmp_path / "run"))
        )
    assert not (tmp_path / "run").exists()


def _run_config(tmp_path: Path, model_dir: Path, **data) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"name_or_path": str(model_dir), "quantization": "none", "device": "cpu"},
            "data": {"seq_len": 32, "cache_dir": str(tmp_path / "cache"), **data},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
        }
    )


@pytest.fixture()
def no_model_load(monkeypatch):
    import lora_dapt.model.load as load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(load, "load_base_model_from", refuse)


def test_pipeline_checks_every_source_and_seq_len_before_the_model_loads(
    tmp_path, tiny_model_dir, no_model_load
):
    from lora_dapt import run

    src = tmp_path / "src"
    docs(src, 3)
    cfg_ = _run_config(tmp_path, tiny_model_dir, sources=[str(src)], eval_sources=[str(tmp_path / "typo")])
    with pytest.raises(DataError, match=r"data.eval_sources \(.*typo\) hold no usable document"):
        run(cfg_)
    cfg_ = _run_config(tmp_path, tiny_model_dir, sources=[str(src)])
    cfg_.eval = cfg_.eval.replace(general_sources=[str(tmp_path / "general_typo")])
    with pytest.raises(DataError, match="general_typo: no such file, directory or matching glob"):
        run(cfg_)
    cfg_ = _run_config(tmp_path, tiny_model_dir, sources=[str(src)])
    cfg_.data = cfg_.data.replace(seq_len=4096)
    with pytest.raises(ConfigError, match="max_position_embeddings = 512"):
        run(cfg_)


def test_tiny_eval_split_is_flagged(caplog):
    before = {"domain": {"ppl": 20.0, "tokens": 4}, "general": {"ppl": 10.0, "tokens": 5000}}
    after = {"domain": {"ppl": 15.0, "tokens": 4}, "general": {"ppl": 10.5, "tokens": 5000}}
    with caplog.at_level(logging.WARNING, logger="lora_dapt"):
        report = forgetting_report(before, after)
    note = (
        "the domain eval scored only 4 tokens (fewer than 1,000): its perplexity change is noise, not a "
        "measurement; hold out more (data.eval_fraction) or give data.eval_sources"
    )
    assert report["domain"]["note"] == note and "note" not in report["general"]
    assert note in caplog.messages
    assert format_forgetting(report).splitlines()[-1] == f"note: {note}"


def test_document_strings_passed_as_paths_say_how_to_pass_texts(tmp_path, tiny_tokenizer):
    texts = [make_text(80, 1), make_text(80, 2)]  # longer than a file name may be
    with pytest.raises(DataError) as e:
        prepare_corpus(texts, tiny_tokenizer, cfg(tmp_path), use_cache=False)
    msg = str(e.value)
    assert "a string in the sources list is read as a PATH; to pass texts, nest them" in msg
    assert msg.startswith("no training documents: the sources '") and len(msg) < 1500  # names cut short
