"""Tensor and context parallelism: a hybrid GPTModel split over gloo processes equals the unsplit
model with the same seed: per-token loss and every gradient (after the CP all-reduce and gathering
the TP shards).

Cases: MHA, GQA (8 query heads / 4 kv heads), a pattern with a dense kv head, the all-gather
exchange, and an all-dense model. The worker is tests/multiproc/megatron_parallel_worker.py.
"""
from pathlib import Path

import pytest

from torchrun import run_workers

WORKER = Path(__file__).parent / "multiproc" / "megatron_parallel_worker.py"
SPLITS = [(2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module", params=SPLITS, ids=[f"tp{tp}_cp{cp}" for tp, cp in SPLITS])
def results(request, tmp_path_factory):
    tp, cp = request.param
    return run_workers(WORKER, tp * cp, tmp_path_factory.mktemp("parallel") / "result.json", str(tp), str(cp))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mha", "gqa", "dense_heads", "all_gather_exchange", "dense"])
def test_split_model_equals_unsplit(results, case):
    r = results[case]
    assert r["loss_rel_diff"] <= 1e-5, r
    assert r["max_grad_rel_diff"] <= 1e-5, r
