"""Tensor and context parallelism: a hybrid GPTModel split over gloo processes equals the unsplit
model with the same seed: per-token loss and every gradient (after the CP all-reduce and gathering
the TP shards).

Cases: MHA, GQA (8 query heads / 4 kv heads), a pattern with a dense kv head, the all-gather
exchange, and an all-dense model. With TP > 1, the model also builds under sequence parallelism
(without TransformerEngine) with its norm weights marked for Megatron's TP all-reduce. The
worker is tests/multiproc/megatron_parallel_worker.py.
"""
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="the workers build Megatron models")
from torchrun import run_workers  # noqa: E402

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


@pytest.mark.slow
def test_sequence_parallel_model_builds_with_norms_marked(results):
    if "sequence_parallel" not in results:
        pytest.skip("sequence parallelism needs tp > 1")
    r = results["sequence_parallel"]
    others = set(r["marked"]) - set(r["norm_params"])   # Megatron marks its row-parallel biases itself
    assert r["norm_params"] and set(r["norm_params"]) <= set(r["marked"]), r
    assert others and all(n.endswith(("linear_proj.bias", "linear_fc2.bias")) for n in others), r
