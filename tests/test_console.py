"""What a user sees, and what signals do: a first line while data and model are prepared, the
accelerator line, one summary line at the end, no third-party notices; a rerun of a finished run
says so, creates nothing, and gives the command that trains on with the same schedule; Ctrl-C is one line saying where the run stopped; SIGTERM before the
first step ends the process at once (even inside a hung dataset build)."""
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from megatron_s2.training.checkpoint import complete_checkpoints
from megatron_s2.training.data import ByteTokenizer, default_dataset
from test_train_loop import PRETRAIN, TINY, _env

COMMAND = [sys.executable, PRETRAIN, *[o for o in TINY if not o.startswith("logging.wandb")]]

# A launch whose dataset build hangs (as Megatron's does on a split with zero tokens).
HANGING_BUILD = """
import sys, time
import megatron_s2.training.loop as loop

def hang(*args, **kwargs):
    print("building datasets", flush=True)
    time.sleep(3600)

loop.build_datasets = hang
from megatron_s2.training.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache holding the default dataset already (preparing it prints progress on stderr), so that
    each test sees the same console whichever runs first."""
    path = str(tmp_path_factory.mktemp("s2cache"))
    default_dataset(path, ByteTokenizer())
    return path


def _snapshot(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def test_console_lines_and_a_rerun_of_the_finished_run(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    command = COMMAND + ["train.iters=4", f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"]
    first = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines[0].startswith(f"tiny: starting in {run_dir} | world 1 = dp 1 x tp 1 x cp 1 x pp 1"), lines[0]
    assert lines[0].endswith("preparing data and model ...")
    assert lines[1].startswith("accelerators: CUDA no, TransformerEngine "), lines[1]
    summary = lines[-1]
    assert summary.startswith("done: 4 steps, 2,048 tokens in "), summary      # 4 x 4 samples x 128 tokens
    for part in (f"checkpoint {run_dir}/checkpoints/iter_0000004", f"metrics {run_dir}/metrics.jsonl",
                 f"picture {run_dir}/attention_pattern.png", f"wandb offline {run_dir}/wandb/offline-run-",
                 f"(upload: wandb sync {run_dir}/wandb/offline-run-"):
        assert part in summary, summary
    offline = summary.split("wandb sync ")[1].rstrip(")")
    assert os.path.isdir(offline)
    assert "Warning" not in first.stderr and "warn(" not in first.stderr, first.stderr[-3000:]

    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert f"| loss {records[-1]['loss']:.4f}" in summary      # "loss" is the logged loss, here too

    before = _snapshot(run_dir)
    again = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith(f"run.dir {run_dir} is complete: its checkpoint iter_0000004 is at "
                                   "train.iters=4, nothing to do. To train on with the same schedule (lr 0.0003 from "
                                   "step 5): python "), again.stdout
    assert again.stdout.count("\n") == 1
    assert _snapshot(run_dir) == before          # no new wandb run, no metrics, nothing

    # The command it gives trains on at the checkpoint's schedule: lr_decay_iters 4, so min_lr.
    given = shlex.split(again.stdout.split("): ", 1)[1].split("; with train.override")[0])
    assert given[0] == "python" and given[1].endswith("scripts/pretrain.py") and given[-2:] == [
        "train.iters=8", "train.use_checkpoint_opt_param_scheduler=true"], given
    on = subprocess.run([sys.executable, PRETRAIN, *given[2:]], env=_env(tmp_path), capture_output=True, text=True,
                        timeout=300)
    assert on.returncode == 0, on.stderr[-3000:]
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["iteration"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records[4:]] == [3e-4] * 4


def _ctrl_c_as_in_a_terminal():
    """A job started in the background by a shell without job control ignores SIGINT, and so would
    the launch under test; give it the default action, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_one_line(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(COMMAND + ["train.iters=100000", "checkpoint.interval=1", f"run.dir={run_dir}",
                                          f"data.cache_dir={cache_dir}"],
                               env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        for line in iter(process.stdout.readline, ""):     # the first checkpoint, then Ctrl-C
            if line.startswith("saved "):
                process.send_signal(signal.SIGINT)
                break
        _, err = process.communicate(timeout=120)          # a lost interrupt fails, not hangs
        assert process.returncode == 130
    finally:
        process.kill()
    assert err.count("\n") == 1 and err.startswith("interrupted during iteration "), err
    assert "of 100000; rerun the same command to resume from " + str(run_dir / "checkpoints" / "iter_") in err
    assert "Traceback" not in err


def test_sigterm_before_the_first_step_ends_the_process_at_once(tmp_path, cache_dir):
    """Nothing to save yet: the default action, even while the dataset build hangs."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HANGING_BUILD, *TINY, f"run.dir={run_dir}",
                                f"data.cache_dir={cache_dir}"],
                               env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in iter(process.stdout.readline, ""):
            if line.startswith("building datasets"):
                process.send_signal(signal.SIGTERM)
                break
        assert process.wait(timeout=30) == -signal.SIGTERM
    finally:
        process.kill()
    assert complete_checkpoints(str(run_dir / "checkpoints")) == []
