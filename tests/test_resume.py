"""Continuing a finished run (megatron_s2/training/resume.py): a resume whose schedule differs from
the checkpoint's is refused (one line: tests/test_cli.py), and each of Megatron's two choices gives
the lr that Megatron's own OptimizerParamScheduler gives for it, with config.yaml recording the
schedule in force; a resume on another data-parallel size goes on when the global batch is set."""
import os
import shutil
from types import SimpleNamespace

import pytest
import yaml
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_s2.training.config import compose_config, validate
from megatron_s2.training.errors import ConfigError
from megatron_s2.training.loop import preflight
from test_cli import _fake_checkpoint
from test_train_loop import TINY, _records, _run


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("s2cache"))


def _megatron_lrs(first_step: int, last_step: int, **schedule) -> list[float]:
    """The lr of each step in [first_step, last_step] under Megatron's scheduler (lr of step n is set
    after n - 1 scheduler steps)."""
    group = {}
    scheduler = OptimizerParamScheduler(
        SimpleNamespace(param_groups=[group]), init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=1,
        lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=100, wd_incr_style="constant", **schedule)
    scheduler.step(first_step - 1)
    lrs = []
    for _ in range(first_step, last_step + 1):
        lrs.append(group["lr"])
        scheduler.step(1)
    return lrs


def _config(run_dir) -> dict:
    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)


def test_a_longer_run_keeps_or_overrides_the_checkpoints_schedule(tmp_path, cache_dir):
    """4 steps (lr_decay_iters null: 4), then train.iters=8: refused without a choice; keeping the
    checkpoint's schedule trains steps 5-8 at min_lr, overriding it decays over 8 from step 5."""
    _run(tmp_path / "keep", cache_dir, "train.iters=4")
    shutil.copytree(tmp_path / "keep", tmp_path / "override")
    with pytest.raises(ConfigError, match=r"^train.lr_decay_iters=8: .*iter_0000004 was trained with "
                                          r"train.lr_decay_iters=4 \(null: train.iters\)"):
        _run(tmp_path / "keep", cache_dir, "train.iters=8")

    _run(tmp_path / "keep", cache_dir, "train.iters=8", "train.use_checkpoint_opt_param_scheduler=true")
    kept = [r["lr"] for r in _records(tmp_path / "keep") if r["iteration"] > 4]
    assert kept == _megatron_lrs(5, 8, lr_decay_steps=4) == [3e-4] * 4
    assert _config(tmp_path / "keep")["train"]["lr_decay_iters"] == 4

    _run(tmp_path / "override", cache_dir, "train.iters=8", "train.override_opt_param_scheduler=true")
    overridden = [r["lr"] for r in _records(tmp_path / "override") if r["iteration"] > 4]
    assert overridden == pytest.approx(_megatron_lrs(5, 8, lr_decay_steps=8), rel=1e-12)
    assert overridden[0] > 3e-4 * 2
    assert _config(tmp_path / "override")["train"]["lr_decay_iters"] == 8


def test_another_data_parallel_size_resumes_with_the_global_batch_set(tmp_path):
    """A checkpoint of one process (global batch 8 = micro 8 x dp 1) resumed by two: refused while
    the global batch is null (tests/test_cli.py), accepted with it set, to the checkpoint's value or
    another one (the user's choice)."""
    _fake_checkpoint(tmp_path / "run", 4)

    def check(*overrides):
        cfg = validate(compose_config([f"run.dir={tmp_path / 'run'}", *overrides]), world_size=2)
        return preflight(cfg, world_size=2)

    with pytest.raises(ConfigError, match=r"^train.global_batch_size=16: null makes it micro batch x dp = 8 x 2"):
        check()
    assert check("train.global_batch_size=8", "train.micro_batch_size=4")[1] == 4
    assert check("train.global_batch_size=16")[1] == 4
