"""Stopping on purpose before train.iters (megatron_s2/training/stopping.py): Megatron's
train.exit_interval and train.exit_duration_in_mins, and scripts/slurm_pretrain.sh as Slurm runs it
(stand-ins for srun and scontrol): SIGUSR1 to the job step's task stops a two-process
torchrun run whose steps are longer than torchrun's shutdown grace, with a checkpoint and exit
status 0 for the whole job; outside Slurm the script says so in one line."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_s2.training.checkpoint import complete_checkpoints
from test_train_loop import REPO, TINY, _env, _run

SLURM_SCRIPT = os.path.join(REPO, "scripts", "slurm_pretrain.sh")

# srun stand-in: runs the step here as its task, whose pid it writes to $STEP_TASK_FILE. Slurm's
# --signal reaches a step's tasks only, not their children (proctrack/cgroup without
# SignalChildrenProcesses, the default): the test signals this pid alone.
FAKE_SRUN = """#!{python}
import os, sys
args = sys.argv[1:]
while args[0].startswith("-"):
    args.pop(0)
with open(os.environ["STEP_TASK_FILE"], "w") as f:
    f.write(str(os.getpid()))
os.execvp(args[0], args)
"""


def test_exit_interval_and_duration_stop_after_a_saved_step(tmp_path):
    cache = str(tmp_path / "cache")
    first = _run(tmp_path / "run", cache, "train.iters=10", "train.exit_interval=3")
    assert first["iteration"] == 3 and first["stopped"] == "train.exit_interval=3"
    second = _run(tmp_path / "run", cache, "train.iters=10", "train.exit_interval=3")     # resumes, stops at 6
    assert second["iteration"] == 6 and second["stopped"] == "train.exit_interval=3"
    late = _run(tmp_path / "run", cache, "train.iters=10", "train.exit_duration_in_mins=1e-9")
    assert late["iteration"] == 7 and late["stopped"] == "train.exit_duration_in_mins=1e-09"
    assert [i for i, _ in complete_checkpoints(str(tmp_path / "run" / "checkpoints"))] == [6, 7]


def test_slurm_script_outside_slurm_says_run_it_under_sbatch(tmp_path):
    env = {k: v for k, v in _env(tmp_path).items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", SLURM_SCRIPT, "train.iters=2"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "run this under sbatch" in result.stderr, result.stderr


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except OSError:
            continue
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_slurm_signal_stops_a_torchrun_run_whose_step_outlasts_torchruns_grace(tmp_path):
    """Steps of 3 s, torchrun's grace 1 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): a SIGTERM to torchrun
    would lose the step (its workers are SIGKILLed mid-step); SIGUSR1 to the step's task, as
    --signal=USR1@300 sends it, stops the run after the step with a checkpoint, exit status 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    for tool in ("srun", "scontrol"):
        os.chmod(bin_dir / tool, 0o755)
    run_dir, task_file = tmp_path / "run", tmp_path / "step_task"
    env = {**_env(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": REPO,
           "SLURM_GPUS_ON_NODE": "2", "MASTER_PORT": str(_free_port()), "STEP_TASK_FILE": str(task_file),
           "OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1"}
    job = subprocess.Popen(["bash", SLURM_SCRIPT, *TINY, "train.iters=1000", "debug.step_sleep_seconds=3",
                            f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in job.stdout:                  # the first step is logged: Slurm's signal comes
            if line.startswith("iter "):
                os.kill(int(task_file.read_text()), signal.SIGUSR1)
                break
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:                   # a failed test leaves no workers behind
            for pid in [job.pid] + _descendants(job.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert job.returncode == 0, out[-2000:] + err[-3000:]
    stopped_at = int(out.split("SIGUSR1: stopped after iteration ")[1].split()[0])
    assert stopped_at in (1, 2), out
    assert [i for i, _ in complete_checkpoints(str(run_dir / "checkpoints"))] == [stopped_at]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
