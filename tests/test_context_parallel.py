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
    """exchange_bytes equals the blocks block_mask says a rank needs, and the bytes that actually
    went through the all-to-all: K and V in the forward (two calls), their gradients sent back in
    the backward (two calls)."""
    for rank_results in cp_results:
        for name, r in rank_results.items():
            if name.endswith("/sparse"):
                predicted = r["bytes"]["sparse"]
                assert predicted == r["predicted_sparse_bytes"], name
                assert predicted < r["bytes"]["all_gather"], name
                forward, backward = r["all_to_all_forward"], r["all_to_all_backward"]
                assert len(forward) == len(backward) == 2, name
                assert sum(c["received"] for c in forward) == predicted, name
                assert sum(c["sent"] for c in backward) == predicted, name
            else:
                assert r["all_to_all_forward"] == r["all_to_all_backward"] == [], name


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


@pytest.mark.parametrize("tp", [1, 2])
def test_bytes_of_the_1p3b_recipe_at_16k_cp4_per_query_head(tp):
    """llama_1p3b_32k's pattern (16 query / 8 kv heads, block 64, 16 local blocks, stride 16, per
    query head) at 16k tokens, cp=4: every rank of every TP slice receives at most 1/4 of the
    all-gather (README quotes the worst rank: 5.81 of 24 MiB per layer per forward at tp=2)."""
    layout = S2Layout(16, 8, 64, 16, 16, head_sharding="query")
    kv_heads = 8 // tp
    worst = max(exchange_bytes(layout, CPGeometry(4, rank, 16384, 64), batch=1, kv_heads=kv_heads, head_dim=128,
                               element_bytes=2, head_offset=t * 16 // tp)["sparse"]
                for rank in range(4) for t in range(tp))
    all_gather = exchange_bytes(None, CPGeometry(4, 0, 16384, 64), batch=1, kv_heads=kv_heads, head_dim=128,
                                element_bytes=2)["all_gather"]
    assert worst <= all_gather / 4
    if tp == 2:
        assert (round(worst / 2**20, 2), all_gather / 2**20) == (5.81, 24.0)


def test_seq_len_must_split_into_whole_blocks():
    with pytest.raises(ValueError, match=r"seq_length \(1000\).*2 \* 2 \* 64"):
        check_cp_seq_len(1000, 2, 64)
