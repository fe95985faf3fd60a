"""Tensor parallelism: a hybrid GPTModel at TP=2 (two gloo processes) equals TP=1, same seed.

Cases: MHA, GQA (8 query heads / 4 kv heads), and a pattern with a dense kv head. The worker
(tests/multiproc/megatron_tp_worker.py) gathers every TP-sharded gradient before comparing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "multiproc" / "megatron_tp_worker.py"


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "result.json"
    # --standalone lets the rendezvous pick a free localhost port.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mha", "gqa", "dense_heads"])
def test_tp2_equals_tp1(tp_results, case):
    r = tp_results[case]
    assert r["loss_rel_diff"] <= 1e-5, r
    assert r["max_grad_rel_diff"] <= 1e-5, r
