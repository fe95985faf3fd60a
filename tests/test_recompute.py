"""Activation recomputation (megatron_s2.recompute on CPU; Megatron's own on a GPU).

The oracle is the same model without recomputation: with dropout on (so the replayed forward must
draw the same masks), fp32, a dense and an S2 layer, unpacked and packed (THD) batches, the loss
and every parameter's gradient must equal, and the recomputed layers must save less (counted with
saved_tensors_hooks, so a wrapper that did nothing would fail). The recipe keys are refused in one
line each where Megatron (or the CPU path) cannot honour them.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_s2 import S2AttentionConfig, build_gpt_model
from megatron_s2.parallel import model_parallel_session
from megatron_s2.saved_tensors import count_saved_bytes
from megatron_s2.training.config import compose_config, validate
from megatron_s2.training.errors import ConfigError

VOCAB, SEQ, BATCH = 96, 64, 2
S2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4)
DOCS = (40, 24, 48, 16)          # one pack of BATCH * SEQ tokens; 40 and 24 are not block multiples
SETTINGS = {"full_uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
            "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
            "core_attn": dict(recompute_granularity="selective")}


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    with model_parallel_session(1):
        yield


def make_model(device="cpu", impl="torch", **recompute):
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                               ffn_hidden_size=96, gated_linear_unit=True, activation_func=F.silu,
                               normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.2,
                               attention_dropout=0.0, use_cpu_initialization=True, **recompute)
    torch.manual_seed(0)
    model = build_gpt_model(config, S2, "DS", vocab_size=VOCAB, max_sequence_length=SEQ, recompute_impl=impl)
    return model.to(device).train()


def batch(packed, device="cpu"):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1)).to(device)
    if not packed:
        return dict(input_ids=tokens[:, :-1], position_ids=torch.arange(SEQ, device=device).expand(BATCH, SEQ),
                    labels=tokens[:, 1:], packed_seq_params=None)
    cu = torch.tensor([0, *itertools.accumulate(DOCS)], dtype=torch.int32, device=device)
    flat = tokens[:, :-1].reshape(1, -1)
    return dict(input_ids=flat, position_ids=torch.cat([torch.arange(n, device=device) for n in DOCS])[None],
                labels=tokens[:, 1:].reshape(1, -1),
                packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                  max_seqlen_q=max(DOCS), max_seqlen_kv=max(DOCS)))


def step(model, data):
    """(loss, {name: grad}, saved bytes per layer) of one forward/backward from a fixed RNG state."""
    model.zero_grad()
    torch.manual_seed(7)
    with count_saved_bytes(model) as saved:
        loss = model(data["input_ids"], data["position_ids"], None, labels=data["labels"],
                     packed_seq_params=data["packed_seq_params"]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved.layers


@pytest.mark.parametrize("packed", [False, True], ids=["sbhd", "thd"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_recompute_gives_the_same_loss_and_gradients(setting, packed):
    data = batch(packed)
    loss, grads, plain_saved = step(make_model(), data)
    again, again_grads, saved = step(make_model(**SETTINGS[setting]), data)
    assert torch.equal(again, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(again_grads[name], grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    recomputed = [0, 1] if setting != "full_block" else [0]        # block: the first recompute_num_layers
    for i in range(2):
        assert (saved[i] < plain_saved[i]) == (i in recomputed), (saved, plain_saved)
    if setting.startswith("full"):                                 # only the layer input stays: [t, 1 or b, h] fp32
        assert saved[0] == BATCH * SEQ * 64 * 4


def test_dropout_masks_differ_between_steps():
    """The equality above means something: the same model draws other masks from another seed."""
    model, data = make_model(), batch(False)
    loss, _, _ = step(model, data)
    torch.manual_seed(8)
    other = model(data["input_ids"], data["position_ids"], None, labels=data["labels"]).mean()
    assert not torch.equal(other.detach(), loss)


def test_model_config_carries_no_recompute_for_megatron():
    """With recompute_impl="torch" Megatron's block must not checkpoint a second time (it would
    reach the CUDA RNG on CPU)."""
    model = make_model(**SETTINGS["full_uniform"])
    assert model.config.recompute_granularity is None
    assert type(model.decoder.layers[0]).__name__ == "RecomputedTransformerLayer"


@pytest.mark.parametrize("recompute, match", [
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
     r"recompute_num_layers \(2\) must be 1 with recompute_method 'uniform'"),
    (dict(recompute_granularity="selective", recompute_modules=["mlp"]), r"may hold only \['core_attn'\]"),
])
def test_torch_recompute_refuses_what_it_cannot_do(recompute, match):
    with pytest.raises(ValueError, match=match):
        make_model(**recompute)


# -- the recipe keys -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, line", [
    (["model.recompute_granularity=full"],
     "model.recompute_granularity=full: needs model.recompute_method (uniform or block) and "
     "model.recompute_num_layers, as in Megatron"),
    (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=5"],
     "model.recompute_num_layers=5: must be between 1 and the layers per pipeline stage (4) with full recomputation"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=3",
      "train.device=cuda"],
     "model.recompute_num_layers=3: must divide the layers per pipeline stage (4) with model.recompute_method=uniform"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=2",
      "train.device=cpu"],
     "model.recompute_num_layers=2: must be 1 with model.recompute_method=uniform on the cpu path (it recomputes "
     "layer by layer); use model.recompute_method=block or the cuda path"),
    (["model.recompute_method=block"],
     "model.recompute_method=block: has no effect without model.recompute_granularity (selective or full)"),
    (["model.recompute_granularity=selective", "model.recompute_num_layers=1"],
     "model.recompute_num_layers=1: applies to full recomputation only (Megatron requires None with selective)"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[moe]"],
     "model.recompute_modules=[moe]: must be a non-empty list of ['core_attn', 'mlp', 'layernorm']"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,mlp]", "train.device=cpu"],
     "model.recompute_modules=[core_attn,mlp]: the cpu path recomputes core_attn only (mlp and layernorm: the "
     "cuda path, Megatron's own)"),
])
def test_recompute_keys_refused_in_one_line(overrides, line, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # lets train.device=cuda validate here
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides), world_size=1)
    assert str(info.value) == line


def test_recompute_keys_reach_megatrons_config():
    from megatron_s2.training.loop import transformer_config

    cfg = validate(compose_config(["model.recompute_granularity=full", "model.recompute_method=block",
                                   "model.recompute_num_layers=3"]), world_size=1)
    config = transformer_config(cfg)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 3)
    config = transformer_config(validate(compose_config(["model.recompute_granularity=selective"]), world_size=1))
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn"]


# -- on a GPU: Megatron's own path -----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["sbhd", "thd"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_megatron_recompute_on_gpu_gives_the_same_loss_and_gradients(setting, packed):
    """Megatron's tensor_parallel.checkpoint (CUDA RNG tracker restored), Triton S2 kernels, fp32."""
    from megatron.core import tensor_parallel

    data = batch(packed, "cuda")
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    loss, grads, plain_saved = step(make_model("cuda", "megatron"), data)
    again, again_grads, saved = step(make_model("cuda", "megatron", **SETTINGS[setting]), data)
    torch.testing.assert_close(again, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(again_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert saved[0] < plain_saved[0]
