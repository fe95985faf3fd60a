"""Bad input to the conversion commands: one line naming the file or key, exit status 2, nothing
written (``scripts/convert_hf.py recipe|export``, ``scripts/pretrain.py checkpoint.init_from=``).
Two cases run the scripts themselves (exit status, no traceback); the rest call their ``main``."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from hf_models import save_hf_model  # noqa: E402

from megatron_s2.hf import cli as convert_cli  # noqa: E402
from megatron_s2.training import cli as pretrain_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama"
    save_hf_model(folder, "llama", layers=2)
    return folder


def _broken(source: Path, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / how
    shutil.copytree(source, folder)
    if how == "gpt2":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    elif how == "no_safetensors":
        os.remove(folder / "model.safetensors")
    elif how == "misshapen":
        from safetensors.torch import load_file, save_file
        weights = load_file(folder / "model.safetensors")
        weights["model.layers.1.self_attn.k_proj.weight"] = weights["model.layers.1.self_attn.k_proj.weight"][:16]
        save_file(weights, folder / "model.safetensors")
    return folder


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("how, named", [
    ("gpt2", "config.json: architectures=['GPT2LMHeadModel'] is not supported"),
    ("no_safetensors", "model.safetensors: missing, and no model.safetensors.index.json"),
    ("misshapen", "model.safetensors: model.layers.1.self_attn.k_proj.weight has shape [16, 64], config.json "
                  "implies [32, 64]"),
])
def test_recipe_refuses_a_folder_in_one_line(source, tmp_path, capsys, how, named):
    folder = _broken(source, tmp_path, how)
    out = tmp_path / "recipes" / "r.yaml"
    assert convert_cli.main(["recipe", str(folder), "--layout", "DS", "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: HF_DIR={folder}: {folder}") and named in line, line
    assert not (tmp_path / "recipes").exists()


def test_recipe_refuses_a_layout_that_does_not_fit(source, tmp_path, capsys):
    assert convert_cli.main(["recipe", str(source), "--layout", "DSD", "--out", str(tmp_path / "r.yaml")]) == 2
    assert _one_line(capsys.readouterr().err) == "error: attention.layout=DSD: has 3 characters but model.num_layers is 2"
    assert not (tmp_path / "r.yaml").exists()


def test_init_from_refuses_a_folder_or_a_recipe_that_does_not_fit(source, tmp_path, capsys):
    run_dir = tmp_path / "run"
    folder = _broken(source, tmp_path, "misshapen")
    assert pretrain_cli.main([f"checkpoint.init_from={folder}", f"run.dir={run_dir}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint.init_from={folder}: {folder}/model.safetensors: "), line
    # the tiny recipe's sizes are not the folder's: the first key that differs, with both values
    assert pretrain_cli.main([f"checkpoint.init_from={source}", f"run.dir={run_dir}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: model.num_layers=4: {source}/config.json gives 2 (num_hidden_layers; "), line
    assert not run_dir.exists()


def test_export_refuses_without_writing(source, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    assert convert_cli.main(["export", str(tmp_path), str(taken)]) == 2
    assert _one_line(capsys.readouterr().err) == f"error: {taken}: exists; export into a new folder"
    assert convert_cli.main(["export", str(tmp_path / "no_run"), str(tmp_path / "out")]) == 2
    assert "has no config.yaml" in _one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["taken"]


@pytest.mark.parametrize("script, args, named", [
    ("convert_hf.py", ["recipe", "{gpt2}", "--layout", "DS", "--out", "{tmp}/r.yaml"], "architectures="),
    ("pretrain.py", ["checkpoint.init_from={source}", "run.dir={tmp}/run"], "model.num_layers=4: "),
])
def test_scripts_exit_2_with_one_line(source, tmp_path, script, args, named):
    gpt2 = _broken(source, tmp_path, "gpt2")
    argv = [a.format(gpt2=gpt2, tmp=tmp_path, source=source) for a in args]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *argv], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert named in _one_line(proc.stderr)
    assert sorted(os.listdir(tmp_path)) == ["gpt2"]


def test_config_path_that_holds_no_such_recipe_is_named(tmp_path, capsys):
    assert pretrain_cli.main(["--config-path", str(tmp_path / "none"), "--config-name", "r"]) == 2
    assert _one_line(capsys.readouterr().err) == f"error: --config-path={tmp_path / 'none'}: is not a directory"
    (tmp_path / "mine.yaml").write_text("defaults:\n  - pretrain_schema\n  - _self_\n")
    assert pretrain_cli.main(["--config-path", str(tmp_path), "--config-name", "r"]) == 2
    assert _one_line(capsys.readouterr().err) == f"error: --config-name=r: no such recipe in {tmp_path}; recipes: mine"
