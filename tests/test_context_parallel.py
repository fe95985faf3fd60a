"""Context parallelism at the attention level: cp ranks (gloo) equal the unsplit attention."""
from pathlib import Path

import pytest
import torch

from megatron_s2.context_parallel import (CPGeometry, check_cp_seq_len, context_parallel_positions, exchange_bytes,
                                         split_batch_for_cp)
from s2attn import S2Layout
from torchrun import run_workers

WORKER = Path(__file__).parent / "multiproc" / "cp_attention_worker.py"


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def cp_results(request, tmp_path_factory):
    return run_workers(WORKER, request.param, tmp_path_factory.mktemp("cp") / "out.json")


@pytest.mark.slow
def test_cp_attention_equals_unsplit(cp_results):
    for rank_results in cp_results:
        for name, r in rank_results.items():
            for key, err in r["errors"].items():
                assert err < 1e-10, (name, key, err)


@pytest.mark.slow
def test_sparse_exchange_moves_what_the_layout_predicts(cp_results):
    for rank_results in cp_results:
        for name, r in rank_results.items():
            if name.endswith("/sparse"):
                assert r["bytes"]["sparse"] == r["predicted_sparse_bytes"], name
                assert r["bytes"]["sparse"] < r["bytes"]["all_gather"], name


def test_split_follows_megatron_order():
    tokens = torch.arange(16).view(1, 16)
    parts = [split_batch_for_cp({"tokens": tokens}, 2, r)["tokens"].tolist() for r in range(2)]
    assert parts == [[[0, 1, 2, 3, 12, 13, 14, 15]], [[4, 5, 6, 7, 8, 9, 10, 11]]]
    assert context_parallel_positions(16, 2, 1).tolist() == parts[1][0]


def test_acceptance_bytes_at_16k_cp4():
    # seq 16384, cp=4, block 64, local_blocks 8, stride 16: sparse at most 1/4 of the all-gather.
    layout = S2Layout(16, 16, 64, 8, 16)
    for rank in range(4):
        b = exchange_bytes(layout, CPGeometry(4, rank, 16384, 64), batch=1, kv_heads=16, head_dim=128, element_bytes=2)
        assert b["sparse"] <= b["all_gather"] / 4, (rank, b)


def test_seq_len_must_split_into_whole_blocks():
    with pytest.raises(ValueError, match=r"seq_length \(1000\).*2 \* 2 \* 64"):
        check_cp_seq_len(1000, 2, 64)
