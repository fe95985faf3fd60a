"""s2attn.benchmark: the SDPA peers compute dense causal attention (against the float64 masked
reference), pinning a backend that cannot run raises instead of falling back, the packed S2 method
attends each document on its own, and the FLOPs counted for an S2 layout are those of its computed
token pairs (within each document when packed)."""
import math

import pytest
import torch

from s2attn import S2Layout
from s2attn.benchmark import AttentionShape, attention_flops, packed_shape, s2_packed_fn, sdpa_causal_fn
from s2attn.reference import masked_attention, token_mask

SHAPE = AttentionShape(2, 96, 4, 2, 32, "float32", "cpu")


@pytest.mark.parametrize("backend", [None, "flash"])
def test_sdpa_peer_is_dense_causal_attention(backend):
    q, k, v = SHAPE.inputs(requires_grad=False)
    causal = torch.ones(SHAPE.seq_len, SHAPE.seq_len, dtype=torch.bool).tril().expand(SHAPE.heads, -1, -1)
    expected, _ = masked_attention(q, k, v, causal, 1 / math.sqrt(SHAPE.head_dim))
    torch.testing.assert_close(sdpa_causal_fn(backend)(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_pinned_backend_that_cannot_run_raises():
    q, k, v = SHAPE.inputs(requires_grad=False)
    with pytest.raises(RuntimeError):
        sdpa_causal_fn("cudnn")(q, k, v)            # CPU tensors: cuDNN has no kernel for them


@pytest.mark.parametrize("vert_stride", [1, 2])
def test_flops_count_the_computed_token_pairs(vert_stride):
    layout = S2Layout(4, 2, block_size=16, local_blocks=2, vert_stride=vert_stride)
    pairs = token_mask(layout, SHAPE.seq_len, SHAPE.seq_len, 0, 0, 0, SHAPE.heads).sum().item()
    forward, backward = attention_flops(layout, SHAPE)
    assert forward == 4 * SHAPE.batch * SHAPE.head_dim * pairs       # QK^T and PV: 2 FLOPs per MAC each
    assert backward == 2.5 * forward
    if vert_stride == 1:
        assert attention_flops(None, SHAPE) == (forward, backward)


def test_packed_method_attends_each_document_alone():
    """Each sequence cut into 3 documents of 32 tokens (two blocks): equal to the float64 S2
    attention of every document as its own sequence."""
    layout = S2Layout(4, 2, block_size=16, local_blocks=1, vert_stride=2)
    q, k, v = SHAPE.inputs(requires_grad=False)
    out = s2_packed_fn(layout, "torch", 3)(q, k, v)
    per_doc = [t.reshape(SHAPE.batch * 3, 32, *t.shape[2:]).double() for t in (q, k, v)]
    mask = token_mask(layout, 32, 32, 0, 0, 0, SHAPE.heads)
    expected, _ = masked_attention(*per_doc, mask, 1 / math.sqrt(SHAPE.head_dim))
    torch.testing.assert_close(out.double(), expected.reshape(out.shape), atol=1e-5, rtol=1e-5)
    pairs = mask.sum().item() * SHAPE.batch * 3
    assert attention_flops(layout, packed_shape(SHAPE, 3))[0] == 4 * SHAPE.head_dim * pairs
    with pytest.raises(ValueError, match="documents"):
        packed_shape(SHAPE, 5)
