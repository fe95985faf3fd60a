"""Config, hybrid layout and validation errors, the FLOPs model, and the portable RoPE.

No process group needed: everything here runs before a model is built.
"""
import math
import re

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_s2 import (PortableRotaryEmbedding, S2AttentionConfig, resolve_hybrid_layout,
                         training_flops_per_token, validate_hybrid_model)
from megatron_s2.context_parallel import context_parallel_positions

S2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4)


@pytest.mark.parametrize("field,value", [
    ("block_size", 48), ("block_size", 8), ("local_blocks", 0), ("vert_stride", 0),
    ("head_sliding_step", -1), ("num_dense_heads", -1), ("homo_head", 1), ("head_sliding_offset", 1.5),
])
def test_s2_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=rf"s2\.{field} .*{re.escape(repr(value))}"):
        S2AttentionConfig(**{field: value})


def test_s2_config_to_layout():
    layout = S2AttentionConfig(block_size=32, local_blocks=3, vert_stride=4, head_sliding_offset=1,
                               num_dense_heads=1).to_layout(8, 4)
    assert (layout.num_heads, layout.num_kv_heads, layout.block_size, layout.local_blocks,
            layout.vert_stride, layout.head_sliding_offset, layout.num_dense_heads) == (8, 4, 32, 3, 4, 1, 1)


def test_resolve_hybrid_layout():
    assert resolve_hybrid_layout(8, dense_every=4) == "DSSSDSSS"
    assert resolve_hybrid_layout(8, dense_layers=[0, 5]) == "DSSSSDSS"
    assert resolve_hybrid_layout(4, layout="SDSD") == "SDSD"
    assert resolve_hybrid_layout(3) == "SSS"
    assert resolve_hybrid_layout(3, dense_layers=[]) == "SSS"


@pytest.mark.parametrize("kwargs,match", [
    ({"layout": "SDS"}, r"3 characters but num_layers is 4"),
    ({"layout": "SDxD"}, r"only contain 'S' .* found \['x'\]"),
    ({"layout": "sdsd"}, r"found \['d', 's'\]"),
    ({"layout": "SDSD", "dense_every": 2}, r"at most one of"),
    ({"dense_every": 0}, r"dense_every must be an integer >= 1, got 0"),
    ({"dense_layers": [1, 4]}, r"dense_layers \[1, 4\] must be layer numbers in \[0, num_layers=4\)"),
    ({"dense_layers": [1, 1]}, r"duplicates"),
])
def test_resolve_hybrid_layout_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_hybrid_layout(4, **kwargs)


GOOD = dict(num_layers=4, num_attention_heads=8, num_query_groups=4, tensor_model_parallel_size=2,
            seq_length=128, s2=S2, layout="DSSS")


def test_validate_accepts_good_model():
    validate_hybrid_model(**GOOD)
    validate_hybrid_model(**{**GOOD, "num_query_groups": None, "context_parallel_size": 2})


@pytest.mark.parametrize("change,match", [
    ({"layout": "DSS"}, r"layout 'DSS' has 3 characters but num_layers is 4"),
    ({"layout": "DSXS"}, r"only contain 'S' \(sparse\) and 'D' \(dense\), found \['X'\]"),
    ({"num_attention_heads": 3, "num_query_groups": 3, "tensor_model_parallel_size": 2},
     r"num_attention_heads \(3\) must be a multiple of tensor_model_parallel_size \(2\)"),
    ({"num_query_groups": 1}, r"num_query_groups \(1\) must be a multiple of tensor_model_parallel_size \(2\)"),
    ({"num_query_groups": 3}, r"num_attention_heads \(8\) must be a multiple of num_query_groups \(3\)"),
    ({"s2": S2AttentionConfig(block_size=16, num_dense_heads=5)},
     r"s2.num_dense_heads \(5\) must be <= the kv heads, num_query_groups \(4\)"),
    ({"seq_length": 120}, r"seq_length \(120\) must be a positive multiple of s2.block_size = 16"),
    ({"seq_length": 96, "context_parallel_size": 2},
     r"seq_length \(96\) .* 2 \* context_parallel_size \(2\) \* s2.block_size = 64"),
])
def test_validate_names_field_and_value(change, match):
    with pytest.raises(ValueError, match=match):
        validate_hybrid_model(**{**GOOD, **change})


def _config(**kw):
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=96, use_cpu_initialization=True)
    return TransformerConfig(**{**base, **kw})


def test_flops_by_hand():
    cfg, seq, vocab = _config(), 128, 100
    s2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=2)
    h, H, G, d, f = 64, 4, 2, 16, 96
    linear = 2 * h * (H + 2 * G) * d + 2 * H * d * h + 2 * 2 * h * f
    n = seq // 16
    dense_attn = 4 * d * H * (n * (n + 1) / 2) * 16 * 16 / seq
    mask = s2.to_layout(H, G).block_mask(n, n)
    sparse_attn = 4 * d * mask.sum().item() * 16 * 16 / seq       # summed over heads
    flops = training_flops_per_token(cfg, "DSSD", s2, seq, vocab)
    assert math.isclose(flops.sparse, 3 * (4 * linear + 2 * dense_attn + 2 * sparse_attn + 2 * h * vocab))
    assert math.isclose(flops.dense_equivalent, 3 * (4 * (linear + dense_attn) + 2 * h * vocab))
    assert flops.predicted_speedup > 1


def test_flops_counts_swiglu_and_dense_limits():
    s2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=2)
    plain = training_flops_per_token(_config(), "SSSS", s2, 128, 100)
    gated = training_flops_per_token(_config(gated_linear_unit=True), "SSSS", s2, 128, 100)
    assert math.isclose(gated.sparse - plain.sparse, 3 * 4 * 2 * 64 * 96)     # a third MLP matrix
    all_dense = training_flops_per_token(_config(), "DDDD", s2, 128, 100)
    assert all_dense.sparse == all_dense.dense_equivalent
    covering = S2AttentionConfig(block_size=16, local_blocks=8, vert_stride=2)   # window >= sequence
    full = training_flops_per_token(_config(), "SSSS", covering, 128, 100)
    assert math.isclose(full.sparse, full.dense_equivalent)


def test_portable_rope_matches_formula_and_cp_slices():
    rope = PortableRotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=100)
    emb = rope(12)
    inv_freq = 1.0 / 100 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    freqs = torch.outer(torch.arange(12, dtype=torch.float32), inv_freq)
    assert emb.shape == (12, 1, 1, 8)
    torch.testing.assert_close(emb[:, 0, 0], torch.cat([freqs, freqs], dim=-1))
    assert "inv_freq" in dict(rope.named_buffers()) and "inv_freq" not in rope.state_dict()

    class FakeCPGroup:
        def size(self):
            return 3

        def rank(self):
            return 1

    assert context_parallel_positions(12, 3, 1).tolist() == [2, 3, 8, 9]
    torch.testing.assert_close(rope(12, cp_group=FakeCPGroup()), emb[[2, 3, 8, 9]])
