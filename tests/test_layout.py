"""S2Layout facts: the smallest GQA case, Phi-3-small's shape, density, coverage, bad input. The mask
against the rules written out per element is in test_conformance.py."""
import warnings

import pytest
import torch

from s2attn import S2Layout


def test_smallest_gqa_case_shards_per_query_head_only_when_asked():
    kw = dict(num_heads=2, num_kv_heads=1, block_size=16, local_blocks=1, vert_stride=2, head_sliding_offset=1)
    with pytest.warns(UserWarning, match="do not cover"):
        kv = S2Layout(**kw)
    query = S2Layout(**kw, head_sharding="query")
    assert kv.block_mask(2, 2)[1].tolist() == [[True, False], [False, True]]
    assert query.block_mask(2, 2)[1].tolist() == [[True, False], [True, True]]     # Phi-3-small's head 1
    assert query.step == 1 and kv.step == 2


@pytest.mark.parametrize("sharding", ["kv", "query"])
def test_phi3_small_layout_and_density(sharding):
    # Phi-3-small's shape: 32 q heads, 8 kv heads, block 64, 16 local blocks, stride 8, offset 1.
    layout = S2Layout(32, 8, 64, 16, 8, head_sliding_offset=1, head_sharding=sharding)
    assert layout.step == 1 and layout.covers_all_residues() and layout.unseen_block_pairs(8192) == 0
    n = 8192 // 64
    mask = layout.block_mask(n, n)
    causal = n * (n + 1) // 2
    assert layout.density(8192) == pytest.approx(mask.sum().item() / (32 * causal))
    # Head 0 with offset 1 uses the blocks j = 7, 15, ... (j + 1) % 8 == 0; head 1 of the same kv
    # head has its own residue only under query sharding: (j + 2) % 8 == 0.
    assert bool(mask[0, n - 1, 7]) and not bool(mask[0, n - 1, 8])
    assert bool(mask[1, n - 1, 6]) == (sharding == "query")
    # The union over heads covers every causal block.
    assert torch.equal(mask.any(0), torch.ones(n, n, dtype=torch.bool).tril())


def test_unseen_block_pairs_counts_what_no_head_attends():
    # The old 1.3B recipe pattern: 8 kv heads x step 2 cover the even residues of stride 16 only.
    with pytest.warns(UserWarning, match="do not cover"):
        kv = S2Layout(16, 8, 64, 16, 16)
    n = 8192 // 64
    union = kv.block_mask(n, n).any(0)
    assert kv.unseen_block_pairs(8192) == 3136 == int((~union).tril().sum())
    assert S2Layout(16, 8, 64, 16, 16, head_sharding="query").unseen_block_pairs(8192) == 0
    assert kv.unseen_block_pairs(16 * 64) == 0          # the window spans the whole sequence


def test_density_of_the_benchmark_setting():
    # b=1, h=8, block 64, local 8, stride 8, s=16384: 18% of the causal block pairs.
    assert S2Layout(8, 8, 64, 8, 8).density(16384) == pytest.approx(0.1787, abs=1e-3)


def test_warns_when_heads_miss_residues():
    with pytest.warns(UserWarning, match="do not cover every residue"):
        S2Layout(4, 4, 64, 4, 16, head_sliding_step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S2Layout(4, 4, 64, 4, 16, head_sliding_step=1, num_dense_heads=1)   # a dense head covers all


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=48), "block_size"), (dict(block_size=8), "block_size"),
    (dict(local_blocks=0), "local_blocks"), (dict(vert_stride=0), "vert_stride"),
    (dict(num_heads=6, num_kv_heads=4), "num_heads"), (dict(num_dense_heads=5), "num_dense_heads"),
    (dict(head_sliding_step=-1), "head_sliding_step"), (dict(head_sharding="group"), "head_sharding"),
])
def test_bad_layout_names_field_and_value(kwargs, field):
    args = dict(num_heads=8, num_kv_heads=4, block_size=64, local_blocks=4, vert_stride=4) | kwargs
    with pytest.raises(ValueError, match=field) as info:
        S2Layout(**args)
    assert str(kwargs[next(iter(kwargs))]) in str(info.value)
