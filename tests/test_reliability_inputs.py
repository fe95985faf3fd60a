"""Bad input: damaged datasets are named in the error (not a crash deep in numpy), the command
line exits with status 2 and one line before any process group with run.dir left as it was, unwritable output
directories and a fresh run over old checkpoints are refused, and wandb online without a key
logs offline after one line on stderr. (Config fields: tests/test_train_config.py.)"""
import os
import shutil
import subprocess
import sys

import pytest

from megatron_s2.training import pretrain, validate
from megatron_s2.training.checkpoint import complete_checkpoints
from megatron_s2.training.config import compose_config
from megatron_s2.training.data import ByteTokenizer, prepare_dataset
from megatron_s2.training.errors import ConfigError
from test_train_loop import PRETRAIN, TINY, _env, _run


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("s2cache"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two small byte-level datasets, a and b, of different sizes."""
    root = tmp_path_factory.mktemp("datasets")
    for name, repeat in (("a", 40), ("b", 70)):
        text = root / f"{name}.txt"
        text.write_text("".join(f"document {i} of {name}: the quick brown fox\n" * 3 for i in range(repeat)))
        prepare_dataset([str(text)], str(root / name), ByteTokenizer(), progress=False)
    return root


def _damage(datasets, tmp_path, how: str) -> str:
    prefix = str(tmp_path / "bad")
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f"{datasets}/a{ext}", prefix + ext)
    if how == "missing .idx":
        os.remove(prefix + ".idx")
    elif how == "truncated .bin":
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 100)
    elif how == "truncated .idx":
        os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
    elif how == "not an index":
        with open(prefix + ".idx", "r+b") as f:
            f.write(b"GARBAGE!!")
    elif how == "mismatched pair":
        shutil.copy(f"{datasets}/b.bin", prefix + ".bin")
    return prefix


@pytest.mark.parametrize("how, words", [
    ("missing .idx", ["bad.idx does not exist"]),
    ("truncated .bin", ["bad.bin is", "truncated"]),
    ("truncated .idx", ["bad.idx is", "truncated or corrupt"]),
    ("not an index", ["not a Megatron index file"]),
    ("mismatched pair", ["different datasets"]),
])
def test_damaged_dataset_is_named(datasets, tmp_path, how, words):
    prefix = _damage(datasets, tmp_path, how)
    with pytest.raises(ValueError) as info:
        validate(compose_config(TINY + [f"data.prefixes=[{datasets}/a,{prefix}]"]), world_size=1)
    message = str(info.value)
    assert message.startswith(f"data.prefixes[1]={prefix}: "), message
    for word in words:
        assert word in message, message


def test_intact_datasets_validate(datasets):
    validate(compose_config(TINY + [f"data.prefixes=[{datasets}/a]", f"data.valid_prefixes=[{datasets}/b]"]),
             world_size=1)


def _snapshot(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A run directory with outputs and a checkpoint, to be left alone by refused launches."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    _run(run_dir, cache_dir, "train.iters=2")
    return run_dir


@pytest.mark.parametrize("overrides, env, line", [
    (["parallel.tp=2"], {"WORLD_SIZE": "3"}, "error: parallel.tp=2: the world size (3) must be"),
    (["train.global_batch_size=5"], {}, "error: train.global_batch_size=5: must be a multiple of"),
    (["data.prefixes=[/nonexistent/corpus]"], {}, "error: data.prefixes[0]=/nonexistent/corpus: "),
    (["checkpoint.resume=false"], {}, "error: checkpoint.resume=false: "),
    (["attention.layout=SS"], {}, "error: attention.layout=SS: "),
])
def test_cli_refuses_before_any_work(tmp_path, cache_dir, finished_run, overrides, env, line):
    """Over a real finished run: exit status 2, one line on stderr, every file under run.dir
    byte-identical. (Every refusal, in-process: tests/test_cli.py.)"""
    before = _snapshot(finished_run)
    result = subprocess.run([sys.executable, PRETRAIN, *TINY, "train.iters=4", f"run.dir={finished_run}",
                             f"data.cache_dir={cache_dir}", *overrides],
                            env={**_env(tmp_path), **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(line) and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stdout == ""
    assert _snapshot(finished_run) == before


def test_unwritable_checkpoint_dir_is_refused_first(tmp_path, cache_dir):
    """A checkpoint.dir that cannot be created: refused before the process group and the model,
    and nothing is created to find out."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"^checkpoint.dir=.*a_file/checkpoints: .*a_file is not a directory"):
        _run(tmp_path / "run", cache_dir, "train.iters=2", f"checkpoint.dir={blocker}/checkpoints")
    assert not os.path.exists(tmp_path / "run")


def test_wandb_online_without_key_goes_offline_with_one_line(tmp_path, cache_dir, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.netrc
    run_dir = tmp_path / "run"
    _run(run_dir, cache_dir, "train.iters=1", "train.warmup_iters=0", "logging.wandb.mode=online")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wandb: logging.wandb.mode=online but no wandb API key"), err
    assert "logging offline instead" in err
    assert any(d.startswith("offline-run-") for d in os.listdir(run_dir / "wandb"))
    assert [i for i, _ in complete_checkpoints(str(run_dir / "checkpoints"))] == [1]
