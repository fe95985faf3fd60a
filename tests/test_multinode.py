"""Several nodes, simulated on one machine (megatron_s2/training/shared_dirs.py): two torchrun
agents (--nnodes=2, one worker each, c10d rendezvous on localhost), each started in a folder of
its own with a relative run.dir, as two nodes without a shared filesystem would resolve it. A fresh
run is refused because rank 1 does not see the marker rank 0 wrote into its run.dir; a rerun where
one node holds a checkpoint and the other none is refused because the ranks would resume from
different iterations. Both refusals are one line from rank 0, exit status 2 on every worker,
before the first step, and leave nothing behind."""
import os
import socket
import subprocess
import sys

import pytest

from test_cli import _fake_checkpoint
from test_train_loop import PRETRAIN, TINY, _env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path, *overrides) -> tuple[str, list[int]]:
    """Launch both agents; (their output together, their exit statuses)."""
    port = _free_port()
    agents = []
    for node in ("node_a", "node_b"):
        os.makedirs(tmp_path / node, exist_ok=True)
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", "--rdzv_id=two_nodes", PRETRAIN, *TINY,
             "run.dir=runs/x", f"data.cache_dir={tmp_path / 'cache'}", *overrides],
            cwd=tmp_path / node, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    return "".join(outputs), [agent.returncode for agent in agents]


@pytest.mark.slow
def test_run_dir_that_each_node_resolves_elsewhere_is_refused(tmp_path):
    output, statuses = _two_nodes(tmp_path)
    assert statuses == [1, 1], output[-3000:]                   # torchrun's status for failed workers
    assert output.count("exitcode  : 2 ") == 2, output[-3000:]  # each worker refused: 2
    (line,) = [line for line in output.splitlines() if line.startswith("error: ")] or [output[-3000:]]
    assert line.startswith(f"error: run.dir={tmp_path}/node_"), line
    assert "1 of 2 ranks (e.g. rank 1 on " in line and "/runs/x) do not see the file rank 0" in line
    assert line.endswith("run.dir must be on a filesystem that every node shares, at the same path")
    assert not os.path.exists(tmp_path / "node_a" / "runs") and not os.path.exists(tmp_path / "node_b" / "runs")


@pytest.mark.slow
def test_nodes_that_would_resume_from_different_checkpoints_are_refused(tmp_path):
    _fake_checkpoint(tmp_path / "node_a" / "runs" / "x", 4, *TINY, "train.iters=8")
    output, statuses = _two_nodes(tmp_path, "train.iters=8")
    assert statuses == [1, 1], output[-3000:]
    assert output.count("exitcode  : 2 ") == 2, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("error: ")] or [output[-3000:]]
    assert "ranks would resume from different checkpoints: rank 0 (on " in line, line
    assert "from iter_0000004" in line and "from none (a fresh start)" in line
    assert line.endswith("run.dir must be on a filesystem that every node shares, at the same path")
