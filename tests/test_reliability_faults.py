"""Faults and resumes: a run stopped and resumed (a checkpoint, SIGTERM, a rank killed mid-training
under torchrun) continues on the uninterrupted run's losses, bit for bit, with dropout on, so the
random state every step draws from must come back too (a reseed instead fails these tests); a
killed rank fails the job fast; a full disk during a save raises a clear error and keeps the last
complete checkpoint, which the next launch resumes.
(A kill during a save: tests/test_train_loop.py::test_kill_during_save_keeps_previous_checkpoint.)"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_s2.training import checkpoint as ckpt
from megatron_s2.training.checkpoint import CheckpointSaveError, complete_checkpoints
from test_train_loop import PRETRAIN, TINY, _env, _records, _run

SCHEDULE = ["train.lr_decay_iters=8"]
DROPOUT = "model.hidden_dropout=0.1"      # every step draws from the RNG


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("s2cache"))


def _losses(run_dir) -> dict[int, float]:
    """The last logged loss of every iteration (a resumed run logs again from its checkpoint)."""
    return {r["iteration"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _torchrun_command(run_dir, cache_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", PRETRAIN,
            *TINY, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
            "parallel.distributed_timeout_minutes=1", DROPOUT, *SCHEDULE, *overrides]


def test_resume_with_dropout_is_exact_and_needs_the_saved_rng(tmp_path, cache_dir, monkeypatch):
    """Stopped at 3 and resumed to 6 == 6 straight, with dropout; the same resume with the RNG
    reseeded instead of restored leaves the straight run's track at step 4."""
    overrides = ["checkpoint.interval=3", DROPOUT, *SCHEDULE]
    _run(tmp_path / "straight", cache_dir, "train.iters=6", *overrides)
    _run(tmp_path / "resumed", cache_dir, "train.iters=3", *overrides)
    shutil.copytree(tmp_path / "resumed", tmp_path / "reseeded")
    _run(tmp_path / "resumed", cache_dir, "train.iters=6", *overrides)
    straight = _losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 7)) and _losses(tmp_path / "resumed") == straight

    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: torch.manual_seed(1234))
    _run(tmp_path / "reseeded", cache_dir, "train.iters=6", *overrides)
    reseeded = _losses(tmp_path / "reseeded")
    assert [reseeded[i] == straight[i] for i in range(1, 7)] == [True] * 3 + [False] * 3


def test_sigterm_stop_resumes_on_the_straight_run(tmp_path, cache_dir):
    """SIGTERM after the first logged step: the run saves where it stopped and exits 0; the next
    launch resumes there and ends on the uninterrupted run's losses (dropout on)."""
    overrides = ["train.iters=30", "train.lr_decay_iters=30", DROPOUT]
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, PRETRAIN, *TINY, *overrides, f"run.dir={run_dir}",
                                f"data.cache_dir={cache_dir}"],
                               env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:         # the first logged step, then SIGTERM
            if line.startswith("iter "):
                process.send_signal(signal.SIGTERM)
                break
        output = process.stdout.read()
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()
    assert "SIGTERM: stopped after iteration" in output, output
    stopped_at = int(output.split("SIGTERM: stopped after iteration")[1].split()[0])
    assert 1 <= stopped_at < 300
    assert [i for i, _ in complete_checkpoints(str(run_dir / "checkpoints"))] == [stopped_at]

    resumed = _run(run_dir, cache_dir, *overrides)
    _run(tmp_path / "straight", cache_dir, *overrides)
    assert resumed["iteration"] == 30
    assert _losses(run_dir) == _losses(tmp_path / "straight")


def _worker_pid(launcher_pid: int, local_rank: int) -> int:
    """The torchrun worker with this LOCAL_RANK (a child of the launcher)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid and f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under pid {launcher_pid}")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_one_iteration(tmp_path, cache_dir):
    """dp=2, SIGTERM to rank 1 only (rank 0 prints): the ranks agree on the flag, so both save
    the same iteration and stop; the job exits 0 with one checkpoint, at that iteration."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(_torchrun_command(run_dir, cache_dir, "train.iters=300", "checkpoint.interval=0"),
                                env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in launcher.stdout:            # rank 0 has logged a step ("iter   1/300"): signal rank 1
            if line.startswith("iter "):
                os.kill(_worker_pid(launcher.pid, local_rank=1), signal.SIGTERM)
                break
        output = launcher.stdout.read()
        returncode = launcher.wait(timeout=120)
    finally:
        launcher.kill()
    assert returncode == 0, output[-3000:]
    stops = [line for line in output.splitlines() if "SIGTERM: stopped after iteration" in line]
    assert len(stops) == 1, output[-3000:]
    stopped_at = int(stops[0].split("SIGTERM: stopped after iteration")[1].split()[0])
    assert 1 <= stopped_at < 300
    assert [i for i, _ in complete_checkpoints(str(run_dir / "checkpoints"))] == [stopped_at]


KILLED = ("train.iters=8", "checkpoint.interval=2")
"""The killed-rank runs: a checkpoint every 2 steps, the rank killed after step 3."""


@pytest.mark.slow
def test_killed_rank_fails_fast_and_next_launch_resumes(tmp_path, cache_dir):
    straight = subprocess.run(_torchrun_command(tmp_path / "straight", cache_dir, *KILLED),
                              env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(_torchrun_command(run_dir, cache_dir, *KILLED), env=_env(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in launcher.stdout:            # rank 0 has logged step 3: kill rank 1
            if line.startswith("iter 3/"):
                os.kill(_worker_pid(launcher.pid, local_rank=1), signal.SIGKILL)
                killed_at = time.monotonic()
                break
        launcher.stdout.read()
        returncode = launcher.wait(timeout=120)
        failed_after = time.monotonic() - killed_at
    finally:
        launcher.kill()
    assert returncode != 0
    assert failed_after < 60, f"the job took {failed_after:.0f}s to fail after a rank died"
    saved = [i for i, _ in complete_checkpoints(str(run_dir / "checkpoints"))]
    assert saved and saved[-1] in (2, 4), saved

    resumed = subprocess.run(_torchrun_command(run_dir, cache_dir, *KILLED),
                             env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/iter_{saved[-1]:07d}" in resumed.stdout
    assert _losses(run_dir) == _losses(tmp_path / "straight")       # bit-identical, every step


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mount (root only; skipped where mounting is not permitted) and a resize function."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")

    def resize(size_kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(mount)], check=True)
    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _used_kib(path) -> int:
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize // 1024


def test_disk_full_during_save_keeps_last_checkpoint(tmp_path, cache_dir, small_tmpfs):
    mount, resize = small_tmpfs
    run_dir, overrides = tmp_path / "run", [f"checkpoint.dir={mount}/checkpoints", "checkpoint.interval=2",
                                            *SCHEDULE]
    _run(run_dir, cache_dir, "train.iters=2", *overrides)
    one_checkpoint = _used_kib(mount)
    resize(one_checkpoint * 3 // 2)            # room for half of the next checkpoint

    with pytest.raises(CheckpointSaveError) as info:
        _run(run_dir, cache_dir, "train.iters=4", *overrides)
    message = str(info.value)
    assert "\n" not in message, message       # one line: the OSError, not dcp's per-rank tracebacks
    assert "iteration 4" in message and "No space left on device" in message, message
    assert f"{mount}/checkpoints/iter_0000002, is kept" in message, message
    assert [i for i, _ in complete_checkpoints(str(mount / "checkpoints"))] == [2]
    before_failure = _losses(run_dir)

    resize(64 * 1024)                           # space again: the kept checkpoint resumes
    result = _run(run_dir, cache_dir, "train.iters=4", *overrides)
    assert result["iteration"] == 4
    assert [i for i, _ in complete_checkpoints(str(mount / "checkpoints"))] == [2, 4]
    assert _losses(run_dir) == before_failure   # steps 3 and 4 again, the same losses


def test_ctrl_c_during_a_save_finishes_the_save_then_stops(tmp_path, cache_dir, monkeypatch):
    """torch.distributed.checkpoint catches BaseException on every rank: an interrupt in the middle
    of a save would become a failed save (exit 1) or be lost. Deferred, the save completes and the
    run stops as for any Ctrl-C, resumable from the checkpoint just written."""
    save = ckpt.dist_checkpointing.save

    def interrupted_save(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)       # Ctrl-C half way through the second save
        return save(*args, **kwargs)

    run_dir = tmp_path / "run"
    _run(run_dir, cache_dir, "train.iters=1", "checkpoint.interval=1", "train.lr_decay_iters=4")
    monkeypatch.setattr(ckpt.dist_checkpointing, "save", interrupted_save)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)    # as in a terminal
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            _run(run_dir, cache_dir, "train.iters=4", "checkpoint.interval=1", "train.lr_decay_iters=4")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert "interrupted during iteration 3 of 4" in str(info.value), info.value
    assert [i for i, _ in complete_checkpoints(str(run_dir / "checkpoints"))] == [1, 2]
