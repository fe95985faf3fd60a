"""The record of a run across launches (megatron_s2/training/metrics.py, wandb_run.py): a launch
that stopped after its last checkpoint, then a resume, leave metrics.jsonl and the offline wandb
run that the final line names (read back with wandb's own reader, `wandb leet inspect`) with every
logged iteration once, the resumed launch's; empty WANDB_* variables count as unset; online
without a key and any wandb failure are one line each."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_s2.training import wandb_run
from megatron_s2.training.config import WandbMode, compose_config, validate
from test_train_loop import TINY, _records, _run

OFFLINE = [o for o in TINY if not o.startswith("logging.wandb")] + ["logging.wandb.mode=auto"]


@pytest.fixture
def no_wandb_settings(tmp_path, monkeypatch):
    """No API key, no netrc, no WANDB_* variable but the empty ones a test sets."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))


def _wandb_history(folder) -> list[dict]:
    """The history records of an offline run folder, read by wandb's own reader."""
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    (file,) = [f for f in os.listdir(folder) if f.endswith(".wandb")]
    out = subprocess.run([wandb_cli, "leet", "inspect", "--json", os.path.join(folder, file)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_every_iteration_once_across_a_rerun(tmp_path, no_wandb_settings, monkeypatch, capsys):
    """Launch 1 logs 1-6 and stops (train.exit_interval) with checkpoints 3 and 6; checkpoint 6 is
    lost (as when a launch is killed after the save of 3). Launch 2 resumes at 3 and runs to 8.
    WANDB_MODE and WANDB_SILENT are set empty throughout (wandb itself refuses them)."""
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.setenv("WANDB_SILENT", "")
    run_dir, cache = tmp_path / "run", str(tmp_path / "cache")
    common = [*OFFLINE, "train.iters=8", "train.lr_decay_iters=8", "checkpoint.interval=3", "checkpoint.keep_last=3"]
    first = _run(run_dir, cache, *common, "train.exit_interval=6")
    assert first["iteration"] == 6
    shutil.rmtree(run_dir / "checkpoints" / "iter_0000006")
    _run(run_dir, cache, *common)
    out, err = capsys.readouterr()
    assert "wandb" not in err, err

    records = [r for r in _records(run_dir) if "loss" in r]
    assert [r["iteration"] for r in records] == list(range(1, 9))
    offline = out.strip().splitlines()[-1].split("(upload: wandb sync ")[1].rstrip(")")
    assert os.path.dirname(os.path.abspath(offline)) == str(run_dir / "wandb")
    history = [h for h in _wandb_history(offline) if "loss" in h]
    assert [h["_step"] for h in history] == list(range(1, 9))          # once each, in order
    assert [h["loss"] for h in history] == [r["loss"] for r in records]
    assert len(os.listdir(run_dir / "wandb" / "superseded")) == 1       # launch 1's folder, out of the way


def test_online_without_a_key_is_one_line_naming_the_setting(tmp_path, no_wandb_settings, monkeypatch, capsys):
    assert wandb_run.wandb_mode(WandbMode.online) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_run.wandb_mode(WandbMode.auto) == "offline"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("wandb: logging.wandb.mode=online but no wandb API key is configured")
    assert lines[1].startswith("wandb: WANDB_MODE=online (with logging.wandb.mode=auto) but no wandb API key")
    assert all("logging offline instead" in line for line in lines)


def test_a_wandb_failure_is_one_line(tmp_path, no_wandb_settings, monkeypatch, capsys):
    import wandb

    def fail(**kwargs):
        raise ValueError("1 validation error for Settings\nmode\n  Input should be 'online'\n  For further information")
    monkeypatch.setattr(wandb, "init", fail)
    cfg = validate(compose_config([*OFFLINE, f"run.dir={tmp_path / 'run'}"]), world_size=1)
    os.makedirs(cfg.run.dir)
    assert wandb_run.start(cfg, {}, [], picture=str(tmp_path / "none.png"), start_iteration=0) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wandb disabled: ValueError: 1 validation error"), err
