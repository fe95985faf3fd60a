"""s2attn.benchmark: the SDPA peers compute dense causal attention (against the float64 masked
reference), pinning a backend that cannot run raises instead of falling back, the packed S2 method
attends each document on its own, and the FLOPs counted for an S2 layout are those of its computed
token pairs (within each document when packed). FlexAttention's block mask, built from the layout's
block mask, equals ``create_block_mask``'s and attends the S2 token mask. scripts/bench_attention.py
writes its report after each length."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from s2attn import S2Layout
from s2attn.benchmark import (AttentionShape, attention_flops, flex_block_mask, packed_shape, s2_packed_fn,
                              sdpa_causal_fn)
from s2attn.reference import masked_attention, token_mask

ROOT = Path(__file__).resolve().parents[1]
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


FLEX_LAYOUT = S2Layout(4, 2, block_size=16, local_blocks=2, vert_stride=3, num_dense_heads=1, head_sharding="query")
BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@pytest.mark.parametrize("seq_len", [96, 88, 16])
def test_flex_block_mask_equals_create_block_mask(seq_len):
    """Every tensor of the BlockMask, the full/partial split included, is the one that torch's
    create_block_mask derives from the oracle's token mask (88: a last query block cut short), and
    its mask_mod is that token mask."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    mask = token_mask(FLEX_LAYOUT, seq_len, seq_len, 0, 0, 0, FLEX_LAYOUT.num_heads)
    ours = flex_block_mask(FLEX_LAYOUT, seq_len, "cpu")
    theirs = create_block_mask(lambda b, h, q, kv: mask[h, q, kv], None, FLEX_LAYOUT.num_heads, seq_len, seq_len,
                               device="cpu", BLOCK_SIZE=FLEX_LAYOUT.block_size)
    for name in BLOCK_MASK_TENSORS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    assert torch.equal(create_mask(ours.mask_mod, None, FLEX_LAYOUT.num_heads, seq_len, seq_len)[0], mask)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")   # eager on purpose: small
def test_flex_attention_with_the_block_mask_is_s2_attention():
    """FlexAttention (eager, forward: no CPU backward) over the block mask equals the float64 S2
    attention of tests' oracle."""
    from torch.nn.attention.flex_attention import flex_attention

    shape = AttentionShape(2, 88, 4, 2, 32, "float32", "cpu")
    q, k, v = shape.inputs(requires_grad=False)
    out = flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=flex_block_mask(FLEX_LAYOUT, 88, "cpu"),
                         enable_gqa=True).transpose(1, 2)
    mask = token_mask(FLEX_LAYOUT, 88, 88, 0, 0, 0, shape.heads)
    expected, _ = masked_attention(q, k, v, mask, 1 / math.sqrt(shape.head_dim))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_report_is_written_after_each_length(tmp_path, monkeypatch):
    """scripts/bench_attention.py rewrites its JSON after every length, so a run stopped during
    the second length (here a KeyboardInterrupt: the SIGINT of a time limit) keeps the first."""
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "scripts" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = tmp_path / "bench.json"
    seen = []

    def fake_time_attention(fn, shape, repeats, backward=True):
        seen.append([run["shape"]["seq_len"] for run in json.loads(report.read_text())["runs"]]
                    if report.exists() else None)
        if shape.seq_len == 256:
            raise KeyboardInterrupt
        return {"forward_s": 0.1, "backward_s": 0.2, "fwd_bwd_s": 0.3}

    monkeypatch.setattr(bench, "time_attention", fake_time_attention)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--preset", "cpu", "--seq-lens", "128", "256", "--methods", "sdpa_causal", "s2_torch",
                    "--memory-seq-len", "0", "--json", str(report), "--figure", ""])
    assert seen == [None, None, [128]]
    written = json.loads(report.read_text())
    assert [run["shape"]["seq_len"] for run in written["runs"]] == [128]
    assert set(written["runs"][0]["results"]) == {"sdpa_causal", "s2_torch"}
