"""Numerical trouble and determinism on the CPU path: a NaN gradient injected through
debug.inject_nan_at_iters is caught before the optimizer step (policy stop or skip, diagnostics
naming the parameter), a skipped step leaves weights and optimizer state untouched, two runs with
one seed are bit-identical, and a NaN on one data-parallel rank is skipped by every rank (torchrun)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_s2.training.checkpoint import complete_checkpoints
from test_train_loop import TINY, _env, _records, _run

NAN_PARAM = "decoder.layers.1.mlp.linear_fc1.weight"
SKIP_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiproc", "skip_step_worker.py")
SCHEDULE = ["train.lr_decay_iters=8"]       # the same lr at every step, whatever train.iters is


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("s2cache"))


def _report(run_dir, iteration: int) -> dict:
    with open(os.path.join(run_dir, f"non_finite_iter_{iteration:07d}.json")) as f:
        return json.load(f)


def _tensors(checkpoint: str, out) -> dict[str, torch.Tensor]:
    """Model weights and optimizer moments of a checkpoint (no process group needed)."""
    dcp_to_torch_save(checkpoint, out)
    return {k: v for k, v in torch.load(out, weights_only=False).items()
            if isinstance(v, torch.Tensor) and not k.startswith("rng")}


def test_same_seed_runs_are_bit_identical(tmp_path, cache_dir):
    for name in ("a", "b"):
        _run(tmp_path / name, cache_dir, "train.iters=4", *SCHEDULE)
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert len(a) == 4
    for ra, rb in zip(a, b):
        assert (ra["iteration"], ra["loss"], ra["grad_norm"]) == (rb["iteration"], rb["loss"], rb["grad_norm"])


def test_nan_stop_saves_diagnostics_and_keeps_last_checkpoint(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"iteration 3 \(train.on_non_finite=stop"):
        _run(run_dir, cache_dir, "train.iters=6", "checkpoint.interval=2", "debug.inject_nan_at_iters=[3]",
             f"debug.inject_nan_param={NAN_PARAM}", *SCHEDULE)
    report = _report(run_dir, 3)
    assert report["iteration"] == 3 and report["policy"] == "stop"
    assert report["non_finite_grads"] == {"rank 0": [NAN_PARAM]}     # only the poisoned layer
    assert math.isfinite(report["loss"]) and math.isnan(report["grad_norm"])
    assert [i for i, _ in complete_checkpoints(str(run_dir / "checkpoints"))] == [2]
    assert [r["iteration"] for r in _records(run_dir)] == [1, 2]


def test_skipped_step_changes_nothing(tmp_path, cache_dir):
    """3 steps with step 3 skipped end with exactly the weights and Adam moments of 2 steps."""
    skipped = _run(tmp_path / "skip", cache_dir, "train.iters=3", "train.on_non_finite=skip",
                   "debug.inject_nan_at_iters=[3]", *SCHEDULE)
    _run(tmp_path / "two", cache_dir, "train.iters=2", *SCHEDULE)
    assert skipped["skipped_steps"] == 1 and skipped["iteration"] == 3
    after_skip = _tensors(skipped["checkpoint"], tmp_path / "skip.pt")
    after_two = _tensors(str(tmp_path / "two" / "checkpoints" / "iter_0000002"), tmp_path / "two.pt")
    assert after_skip.keys() == after_two.keys() and any(k.startswith("optimizer") for k in after_skip)
    for key in after_two:
        assert torch.equal(after_skip[key], after_two[key]), key


def test_skip_counts_and_stops_after_k_in_a_row(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="2 in a row"):
        _run(run_dir, cache_dir, "train.iters=8", "train.on_non_finite=skip", "train.max_consecutive_skips=2",
             "debug.inject_nan_at_iters=[2,4,5]", *SCHEDULE)
    records = _records(run_dir)
    assert [(r["iteration"], r["skipped_in_a_row"]) for r in records if "skipped_steps" in r] == [(2, 1), (4, 1)]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 3]
    assert _report(run_dir, 5)["skipped_in_a_row"] == 2


@pytest.mark.slow
def test_nan_on_one_rank_skips_on_every_rank(tmp_path, cache_dir):
    """dp=2: rank 0's gradient is poisoned after the data-parallel all-reduce, so rank 1 sees a
    finite loss and norm of its own; both skip the step and the run completes. Every rank's
    parameters, recorded before each step, show it: step 1 (full lr, no warmup) changed them, step
    2 did not, and the two ranks hold the same parameters throughout (a rank that stepped alone
    would differ)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SKIP_WORKER,
         str(tmp_path / "params"), *TINY, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "train.iters=3",
         "train.warmup_iters=0", "train.on_non_finite=skip", "debug.inject_nan_at_iters=[2]",
         "parallel.distributed_timeout_minutes=1"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = _report(run_dir, 2)
    assert list(report["non_finite_grads"]) == ["rank 0"]
    assert report["per_rank"]["rank 1"]["grad_norm"] < float("inf")    # rank 1's own view was finite
    records = _records(run_dir)
    assert [r["iteration"] for r in records if "skipped_steps" in r] == [2]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 3]

    ranks = [torch.load(tmp_path / f"params.rank{r}.pt") for r in (0, 1)]
    for before_step in ranks:
        assert len(before_step) == 3
        assert any(not torch.equal(before_step[0][k], before_step[1][k]) for k in before_step[0])   # step 1
        assert all(torch.equal(before_step[1][k], before_step[2][k]) for k in before_step[1])       # skipped
    for step in range(3):
        assert all(torch.equal(ranks[0][step][k], ranks[1][step][k]) for k in ranks[0][step]), step
