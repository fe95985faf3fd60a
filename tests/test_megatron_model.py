"""A hybrid GPTModel built from the S2 layer specs, in one process (gloo, TP=1, CPU).

Covers: forward + backward, the layer modules following the layout, a sparse layer's output
against the float64 dense reference with the S2 mask, all-S with a covering window equal to all-D,
the pipeline-stage slice of the layout, errors raised before any model is built, and our norm (the
local spec's, sequence-parallel capable) against its float64 formula.
"""
import math

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_s2 import (DenseCoreAttention, S2AttentionConfig, S2CoreAttention, build_gpt_model,
                         get_gpt_s2_layer_specs)
from megatron_s2.norm import Norm
from megatron_s2.parallel import model_parallel_session
from s2attn.reference import reference_attention

SEQ, VOCAB, BATCH = 128, 96, 2
S2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4)


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    with model_parallel_session(1):
        yield


def make_config(num_layers, heads=8, groups=4, **kw):
    base = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=heads, num_query_groups=groups,
                ffn_hidden_size=128, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    return TransformerConfig(**{**base, **kw})


def build(layout, s2=S2, seed=0, **kw):
    torch.manual_seed(seed)
    return build_gpt_model(make_config(len(layout), **kw), s2, layout, vocab_size=VOCAB,
                           max_sequence_length=SEQ)


def loss_of(model, device="cpu"):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1)).to(device)
    position_ids = torch.arange(SEQ, device=device).expand(BATCH, SEQ)
    return model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()


def test_hybrid_model_trains_and_follows_layout():
    layout = "DSSD"
    model = build(layout, gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    kinds = [type(layer.self_attention.core_attention) for layer in model.decoder.layers]
    assert kinds == [DenseCoreAttention, S2CoreAttention, S2CoreAttention, DenseCoreAttention]
    norms = [m for m in model.modules() if isinstance(m, Norm)]
    assert len(norms) == 2 * len(layout) + 1                      # two per layer and the final norm
    loss = loss_of(model)
    assert math.isfinite(loss.item())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def sparse_layer_io(model, layer, device="cpu"):
    """(q, k, v as [b, s, h, d], output as [b, s, h, d], layout) of one S layer during a forward."""
    core = model.decoder.layers[layer].self_attention.core_attention
    seen = {}
    handle = core.register_forward_hook(lambda mod, args, out: seen.update(qkv=args[:3], out=out))
    loss_of(model, device)
    handle.remove()
    q, k, v = (t.detach().transpose(0, 1) for t in seen["qkv"])
    out = seen["out"].detach().view(SEQ, BATCH, q.shape[2], -1).transpose(0, 1)
    return q, k, v, out, core.layout


def test_sparse_layer_matches_float64_reference():
    q, k, v, got, layout = sparse_layer_io(build("DSD"), 1)
    assert q.shape[2] == 8 and k.shape[2] == 4                                    # GQA kept grouped
    expected, _ = reference_attention(q.double(), k.double(), v.double(), layout,
                                      1 / math.sqrt(q.shape[-1]), 0, 0, 0)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
    # The pattern is really sparse here: full causal attention gives another answer.
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
    assert (dense.transpose(1, 2) - got).abs().max() > 1e-3


@pytest.mark.gpu
def test_sparse_layer_on_cuda_bf16_matches_float64_reference():
    config = make_config(3, heads=4, groups=2, params_dtype=torch.bfloat16, bf16=True)
    torch.manual_seed(0)
    model = build_gpt_model(config, S2, "DSD", vocab_size=VOCAB, max_sequence_length=SEQ).cuda()
    q, k, v, got, layout = sparse_layer_io(model, 1, "cuda")
    assert got.is_cuda and got.dtype == torch.bfloat16
    expected, _ = reference_attention(q.double(), k.double(), v.double(), layout,
                                      1 / math.sqrt(q.shape[-1]), 0, 0, 0)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)


def test_all_sparse_with_covering_window_equals_all_dense():
    covering = S2AttentionConfig(block_size=16, local_blocks=SEQ // 16, vert_stride=4)
    sparse, dense = build("SSS", s2=covering, seed=3), build("DDD", s2=covering, seed=3)
    for p_s, p_d in zip(sparse.parameters(), dense.parameters()):
        assert torch.equal(p_s, p_d)
    loss_s, loss_d = loss_of(sparse), loss_of(dense)
    loss_s.backward()
    loss_d.backward()
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-6, atol=0)
    for (name, p_s), p_d in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p_s.grad, p_d.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pipeline_stage_keeps_global_layout():
    config = make_config(4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    spec = get_gpt_s2_layer_specs(config, S2, "SSDS", use_te=False, pp_rank=1)
    cores = [s.submodules.self_attention.submodules.core_attention for s in spec.layer_specs]
    assert len(cores) == 2 and cores[0] is DenseCoreAttention and cores[1].func is S2CoreAttention


@pytest.mark.parametrize("layout,kw,match", [
    ("DSS", {}, r"layout 'DSS' has 3 characters but num_layers is 4"),
    ("DSQS", {}, r"found \['Q'\]"),
    ("DSSS", {"use_cpu_initialization": False}, r"use_cpu_initialization must be True"),
    ("DSSS", {"attention_dropout": 0.1}, r"attention_dropout must be 0"),
])
def test_bad_models_fail_with_named_fields(layout, kw, match):
    if "use_cpu_initialization" in kw and torch.cuda.is_available():
        pytest.skip("only an error without CUDA")
    config = make_config(4, **kw)
    with pytest.raises(ValueError, match=match):
        build_gpt_model(config, S2, layout, vocab_size=VOCAB, max_sequence_length=SEQ)


def test_bad_sequence_length_fails_before_build():
    with pytest.raises(ValueError, match=r"seq_length \(120\) must be a positive multiple of s2.block_size = 16"):
        build_gpt_model(make_config(2), S2, "SD", vocab_size=VOCAB, max_sequence_length=120)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_norm_matches_float64_formula(normalization, sequence_parallel):
    config = make_config(1, normalization=normalization, sequence_parallel=sequence_parallel,
                         tensor_model_parallel_size=2 if sequence_parallel else 1)
    norm = Norm(config, 64, eps=1e-5)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 64) * 3 + 1
    x64, w = x.double(), norm.weight.double()
    if normalization == "RMSNorm":
        expected = x64 / (x64.square().mean(-1, keepdim=True) + 1e-5).sqrt() * w
    else:
        centred = x64 - x64.mean(-1, keepdim=True)
        expected = centred / (centred.square().mean(-1, keepdim=True) + 1e-5).sqrt() * w + norm.bias.double()
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-5, rtol=1e-5)
    got_bf16 = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16.double(), expected, atol=5e-2, rtol=2e-2)
    assert len(list(norm.parameters())) == (1 if normalization == "RMSNorm" else 2)
    assert all(p.sequence_parallel is sequence_parallel for p in norm.parameters())   # read by finalize_model_grads


def test_norm_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match=r"config.normalization must be one of .* got 'L2Norm'"):
        Norm(make_config(1, normalization="L2Norm"), 64)
    with pytest.raises(ValueError, match=r"layernorm_zero_centered_gamma=True"):
        Norm(make_config(1, layernorm_zero_centered_gamma=True), 64)
