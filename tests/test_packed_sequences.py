"""Packed documents (Megatron's PackedSeqParams, qkv_format "thd") through the core-attention
modules and the hybrid GPT model, in one process (gloo, TP=1, CPU), and the FLOPs model's count
of within-document blocks.

The model-level oracle is the same documents run one by one as ordinary [1, len] sequences: a pack
must give the same per-token loss and the same parameter gradients. Documents there are multiples
of the block size, since the unpacked S2 path takes only those; block boundaries that are not
block-aligned inside a pack are covered at the kernel level (test_varlen_attention).
"""
import itertools
import math
from pathlib import Path

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_s2 import (DenseCoreAttention, S2AttentionConfig, S2CoreAttention, build_gpt_model,
                         training_flops_per_token)
from megatron_s2.parallel import model_parallel_session
from s2attn.reference import reference_document_attention
from torchrun import run_workers

VOCAB = 96
S2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4)
DOCS = (32, 48, 16, 32)                 # 128 tokens in 4 documents


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    with model_parallel_session(1):
        yield


def make_config(num_layers, **kw):
    base = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                ffn_hidden_size=128, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    return TransformerConfig(**{**base, **kw})


def packed_params(lengths) -> PackedSeqParams:
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


# -- the core-attention modules --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["S", "D"])
@pytest.mark.parametrize("lengths", [(37, 50, 70, 19), (157,), (16, 0, 141)], ids=["unaligned", "one", "zero_length"])
@pytest.mark.parametrize("squeezed", [True, False], ids=["thd", "t1hd"])
def test_core_attention_matches_document_mask(kind, lengths, squeezed):
    """A module's output on a pack equals the float64 dense document-masked attention (for a D
    layer: the same mask with every block active)."""
    config = make_config(1)
    s2 = S2 if kind == "S" else S2AttentionConfig(block_size=16, local_blocks=1, vert_stride=1)
    core = (S2CoreAttention(config, 1, AttnMaskType.causal, "self", s2=S2) if kind == "S"
            else DenseCoreAttention(config, 1, AttnMaskType.causal, "self"))
    t = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, heads, 8, generator=gen) for heads in (8, 4, 4))
    params = packed_params(lengths)
    args = (q, k, v) if squeezed else (q[:, None], k[:, None], v[:, None])
    out = core(*args, None, packed_seq_params=params)
    assert out.shape == (t, 8 * 8)
    layout = s2.to_layout(8, 4)
    want, _ = reference_document_attention(q.double(), k.double(), v.double(), layout, 8 ** -0.5, 0,
                                           params.cu_seqlens_q, params.cu_seqlens_kv)
    torch.testing.assert_close(out.double(), want.reshape(t, -1), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("change, match", [
    (dict(qkv_format="sbhd"), "qkv_format must be 'thd'"),
    (dict(cu_seqlens_kv=torch.tensor([0, 64, 128], dtype=torch.int32)), "cu_seqlens_kv must equal cu_seqlens_q"),
    (dict(cu_seqlens_q_padded=torch.tensor([0, 40, 128], dtype=torch.int32)),
     "cu_seqlens_q_padded must equal cu_seqlens_q"),
])
def test_packed_params_refused_with_named_field(change, match):
    core = DenseCoreAttention(make_config(1), 1, AttnMaskType.causal, "self")
    params = packed_params((32, 96))
    for key, value in change.items():
        setattr(params, key, value)
    q, k = torch.randn(128, 8, 8), torch.randn(128, 4, 8)
    with pytest.raises(ValueError, match=match):
        core(q, k, k, None, packed_seq_params=params)


def test_packing_refused_under_context_parallelism():
    core = S2CoreAttention(make_config(1), 1, AttnMaskType.causal, "self", s2=S2)
    core.cp_size = 2                  # as a CP=2 rank would have it; the refusal comes before any exchange
    q, k = torch.randn(64, 8, 8), torch.randn(64, 4, 8)
    with pytest.raises(ValueError, match=r"not supported with context parallelism \(context_parallel_size 2\)"):
        core(q, k, k, None, packed_seq_params=packed_params((32, 32)))


# -- the hybrid model ------------------------------------------------------------------------------
def per_token_loss_and_grads(model, tokens, labels, packed):
    """(per-token loss [t], {name: grad}) of documents given as a pack or (packed=None) one by one."""
    model.zero_grad()
    if packed is not None:
        positions = torch.cat([torch.arange(n) for n in DOCS])[None]
        loss = model(tokens[None], positions, None, labels=labels[None], packed_seq_params=packed)[0]
    else:
        bounds = [0, *itertools.accumulate(DOCS)]
        loss = torch.cat([model(tokens[None, a:b], torch.arange(b - a)[None], None, labels=labels[None, a:b])[0]
                          for a, b in zip(bounds[:-1], bounds[1:])])
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["DSSD", "SS"])
def test_packed_batch_equals_documents_one_by_one(layout):
    """Same per-token loss and parameter gradients; RoPE positions restart in each document (Megatron's
    thd rotary path), so a pack differs from the same tokens as one unmasked sequence."""
    torch.manual_seed(0)
    model = build_gpt_model(make_config(len(layout)), S2, layout, vocab_size=VOCAB, max_sequence_length=128)
    tokens, labels = torch.randint(0, VOCAB, (2, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    packed_loss, packed_grads = per_token_loss_and_grads(model, tokens, labels, packed_params(DOCS))
    loose_loss, loose_grads = per_token_loss_and_grads(model, tokens, labels, None)
    torch.testing.assert_close(packed_loss, loose_loss, atol=1e-5, rtol=1e-5)
    for name, grad in loose_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    model.zero_grad()
    whole = model(tokens[None], torch.arange(sum(DOCS))[None], None, labels=labels[None])[0].detach()
    assert not torch.allclose(whole[DOCS[0]:], packed_loss[DOCS[0]:], atol=1e-3)


# -- FLOPs -----------------------------------------------------------------------------------------
def test_flops_count_only_within_document_blocks():
    """By hand: attention FLOPs of a pack are the sum of its documents' block pairs (partial blocks
    in full); one document of seq_length gives the unpacked figure; the linear part is unchanged."""
    config, seq, vocab = make_config(2), 128, VOCAB
    whole = training_flops_per_token(config, "SD", S2, seq, vocab)
    assert training_flops_per_token(config, "SD", S2, seq, vocab, document_lengths=[seq]) == whole
    docs = [40, 0, 64, 24]                                   # 3, 0, 4, 2 blocks
    packed = training_flops_per_token(config, "SD", S2, seq, vocab, document_lengths=docs)
    layout, d, heads = S2.to_layout(8, 4), 8, 8
    per_pair = 4 * d * 16 * 16 / seq                         # per query head and block pair, per token
    sparse_pairs = sum(layout.block_mask(n, n).sum().item() for n in (3, 4, 2))   # over all heads
    dense_pairs = heads * sum(n * (n + 1) / 2 for n in (3, 4, 2))
    whole_sparse = layout.block_mask(8, 8).sum().item()
    whole_dense = heads * 8 * 9 / 2
    assert math.isclose(whole.sparse - packed.sparse, 3 * per_pair * (whole_sparse - sparse_pairs + whole_dense - dense_pairs))
    assert math.isclose(whole.dense_equivalent - packed.dense_equivalent, 3 * 2 * per_pair * (whole_dense - dense_pairs))


@pytest.mark.parametrize("docs", [[64, 60], [64, -1, 65], [64.0, 64]])
def test_flops_refuse_bad_document_lengths(docs):
    with pytest.raises(ValueError, match=r"document_lengths must be non-negative integers summing to seq_length \(128\)"):
        training_flops_per_token(make_config(2), "SD", S2, 128, VOCAB, document_lengths=docs)


# -- tensor parallelism ----------------------------------------------------------------------------
@pytest.mark.slow
def test_packed_batch_equals_documents_one_by_one_under_tp2(tmp_path):
    """The same check as above on a TP=2 model (S2 heads at their global head_offset), per rank."""
    r = run_workers(Path(__file__).parent / "multiproc" / "packed_tp_worker.py", 2, tmp_path / "result.json", "2")
    assert r["loss_rel_diff"] <= 1e-5 and r["max_grad_rel_diff"] <= 1e-5, r
