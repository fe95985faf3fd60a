"""Memory of one rank of a hybrid S2/dense GPT model: parameters, and the activations each layer
keeps for its backward pass, counted tensor by tensor, without building anything.

What is counted is what autograd holds between a micro batch's forward and its backward in the
model ``build_gpt_model`` makes with the local (non-TransformerEngine) layer specs: RMSNorm, RoPE,
Megatron's linear layers and MLP (its unfused activation), our core attention. Each layer keeps
(elements per token of this rank; ``sp`` = tp under sequence parallelism, else 1):

- input and pre-MLP norm: the input (hidden/sp) and its fp32 rstd; on CPU also the normalized
  input (torch's CPU rms_norm is composite; its CUDA kernel is fused and keeps input and rstd);
- the QKV projection's input (hidden/sp) and output ((n + 2g) d / tp: the value is a view of it);
  query and key after RoPE (n d / tp, g d / tp), RoPE's cos and sin for query and key (4 x head_dim
  per position, not per token);
- the core attention's output (n d / tp) and fp32 log-sum-exp (n / tp); S layers keep no [s, s]
  scores (nor do dense ones: flash attention). The output projection's input is a further copy
  unless it is a view of the attention output (S layers under Triton; dense layers on CPU, or with
  micro batch 1). Under context parallelism (S and D layers alike) the key and value of the whole
  sequence (2 g d / tp per position of the global sequence, zeros where the sparse exchange brings
  nothing) replace the QKV output and key, and the output projection always gets a copy;
- the MLP: its input (hidden/sp), fc1's output (2 f / tp with SwiGLU), and with SwiGLU three
  more f / tp (SiLU output, the linear half plus its offset, their product), with GELU one;
- with hidden dropout, two masks (1 byte per element on CUDA, the activation dtype on CPU).

Recomputation (Megatron's meaning): ``core_attn`` keeps the core attention's inputs (query, key
and the QKV output the value views) and its output instead of the attention out, lse and the
exchanged K/V; ``mlp`` keeps the MLP input only; ``full`` keeps the layer input only. Megatron's
``layernorm`` module (the norms' outputs discarded and rebuilt) is not modelled: counted as kept. Outside the
layers: token ids, the final norm, the output layer's input, the loss's fp32 softmax over this
rank's vocabulary slice, the embedding dropout mask.

Checked against ``torch.autograd.graph.saved_tensors_hooks`` on CPU (``scripts/saved_bytes.py``,
tests/test_memory_plan.py). Not counted: gradient temporaries inside a backward, allocator
fragmentation, CUDA context, NCCL buffers, cuBLAS workspaces. Limits (ValueError): RMSNorm
without linear biases, RoPE; packed documents only without context parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import DENSE, SPARSE, S2AttentionConfig
from .context_parallel import CPGeometry, exchange_bytes

RECOMPUTE_SETTINGS = ("none", "core_attn", "mlp", "core_attn+mlp", "full")
"""Per-layer recomputation settings: none, Megatron's selective modules, full."""
DEVICES = ("cpu", "cuda")


def activation_bytes_per_element(config: TransformerConfig) -> int:
    """Bytes of one activation element: 2 in bf16/fp16, else ``config.params_dtype``'s size."""
    return 2 if config.bf16 or config.fp16 else config.params_dtype.itemsize


def _check(config: TransformerConfig) -> None:
    if config.normalization != "RMSNorm" or config.add_bias_linear:
        raise ValueError(f"the memory model covers RMSNorm without linear biases, got normalization "
                         f"{config.normalization!r}, add_bias_linear {config.add_bias_linear}")


def parameters_per_rank(config: TransformerConfig, vocab_size: int, *, num_layers: int | None = None,
                        pre_process: bool = True, post_process: bool = True,
                        share_embeddings_and_output_weights: bool = False) -> int:
    """Parameter elements one tensor-parallel rank holds for ``num_layers`` layers (default all)
    and, on the first/last pipeline stage, the embedding / final norm and output layer.
    ``vocab_size`` is the padded vocabulary (a multiple of tp)."""
    t, h, d = config.tensor_model_parallel_size, config.hidden_size, config.kv_channels
    n, g, f = config.num_attention_heads, config.num_query_groups, config.ffn_hidden_size
    layers = config.num_layers if num_layers is None else num_layers
    qkv = (n + 2 * g) * d // t
    per_layer = (2 * h + h * qkv + (qkv if getattr(config, "add_qkv_bias", False) else 0)
                 + n * d // t * h + (2 if config.gated_linear_unit else 1) * f // t * h + f // t * h
                 + (2 * d if config.qk_layernorm else 0))
    total = layers * per_layer
    if pre_process:
        total += vocab_size // t * h
    if post_process:
        total += h + (0 if share_embeddings_and_output_weights and pre_process else vocab_size // t * h)
    return total


@dataclass(frozen=True)
class Shape:
    """One micro batch as one rank sees it."""

    seq_length: int
    """Tokens per sample (the whole sequence, before context parallelism)."""
    micro_batch_size: int
    device: str = "cuda"
    """"cuda" or "cpu": where the implementations differ (norm, dropout mask, S output copy)."""
    packed: bool = False
    """The micro batch is one THD pack of seq_length x micro_batch_size tokens (documents of a
    block's multiple: on CPU the torch path pads the keys of other documents)."""


def layer_activations(config: TransformerConfig, kind: str, shape: Shape, recompute: str = "none") -> dict[str, int]:
    """Bytes an ``S`` or ``D`` layer keeps for backward per micro batch, by tensor group (see the
    module docstring), under one of ``RECOMPUTE_SETTINGS``."""
    _check(config)
    if kind not in (SPARSE, DENSE) or recompute not in RECOMPUTE_SETTINGS or shape.device not in DEVICES:
        raise ValueError(f"kind must be S or D, recompute one of {RECOMPUTE_SETTINGS}, device one of "
                         f"{DEVICES}; got {kind!r}, {recompute!r}, {shape.device!r}")
    t, cp = config.tensor_model_parallel_size, config.context_parallel_size
    if shape.packed and cp > 1:
        raise ValueError("packed documents are not supported with context parallelism")
    sp = t if config.sequence_parallel else 1
    a = activation_bytes_per_element(config)
    h, d = config.hidden_size, config.kv_channels
    n, g, f = config.num_attention_heads, config.num_query_groups, config.ffn_hidden_size
    cpu = shape.device == "cpu"
    tokens = shape.seq_length * shape.micro_batch_size // cp          # this rank's tokens
    batch = 1 if shape.packed else shape.micro_batch_size
    positions = tokens // batch                                       # per sequence (RoPE's cos/sin)

    residual = tokens * h // sp * a
    norm = residual + tokens // sp * 4 + (residual if cpu else 0)
    if recompute == "full":
        return {"layer_input": residual}
    out = tokens * n * d // t * a
    terms = {"input_norm": norm, "qkv_input": residual, "rope": 4 * positions * d * a}
    if "core_attn" in recompute:
        terms.update(qkv_output=tokens * (n + 2 * g) * d // t * a, key=tokens * g * d // t * a,
                     query=out, proj_input=out)
    else:
        # The output projection's input is a copy of the attention output (rather than a view)
        # for the torch S path (token-major blocks), dense packs (one output per document, then
        # cat) and CUDA's flash SDPA, whose output is [b, s, h, d] in memory (CPU's keeps q's).
        copy = cpu if kind == SPARSE else shape.packed or (not cpu and batch > 1)
        if cp > 1:
            terms["kv_whole_sequence"] = 2 * batch * shape.seq_length * g * d // t * a
        else:
            terms.update(qkv_output=tokens * (n + 2 * g) * d // t * a, key=tokens * g * d // t * a)
        terms.update(query=out, attention_out=out, lse=tokens * n // t * 4,
                     proj_input=out if cp > 1 or copy else 0)
    if config.hidden_dropout > 0:
        terms["dropout_masks"] = 2 * tokens * h // sp * (a if cpu else 1)
    terms.update(pre_mlp_norm=norm, mlp_input=residual)
    if "mlp" not in recompute:
        gated = config.gated_linear_unit
        terms.update(fc1_output=(2 if gated else 1) * tokens * f // t * a,
                     activation=(3 if gated else 1) * tokens * f // t * a)
    return terms


def outside_layers(config: TransformerConfig, vocab_size: int, shape: Shape, *, pre_process: bool = True,
                   post_process: bool = True) -> dict[str, int]:
    """Bytes kept outside the layers per micro batch: token ids and the embedding dropout mask
    (first stage); final norm, output layer input, the loss's fp32 softmax and label masks (last)."""
    t, cp = config.tensor_model_parallel_size, config.context_parallel_size
    sp = t if config.sequence_parallel else 1
    a = activation_bytes_per_element(config)
    tokens = shape.seq_length * shape.micro_batch_size // cp
    residual = tokens * config.hidden_size // sp * a
    terms = {}
    if pre_process:
        terms["token_ids"] = tokens * 8
        if config.hidden_dropout > 0:
            terms["embedding_dropout_mask"] = tokens * config.hidden_size // sp * (a if shape.device == "cpu" else 1)
    if post_process:
        terms.update(final_norm=residual + tokens // sp * 4 + (residual if shape.device == "cpu" else 0),
                     output_input=residual, softmax=tokens * vocab_size // t * 4, labels=tokens * 9)
    return terms


def logits_bytes(config: TransformerConfig, vocab_size: int, shape: Shape) -> int:
    """The output layer's logits, alive next to the loss's fp32 copy while the loss is computed."""
    tokens = shape.seq_length * shape.micro_batch_size // config.context_parallel_size
    return tokens * vocab_size // config.tensor_model_parallel_size * activation_bytes_per_element(config)


def layer_recompute_settings(config: TransformerConfig, num_local_layers: int) -> list[str]:
    """The setting each layer of a pipeline stage gets from ``config``'s recompute knobs, as
    Megatron applies them (full/block: the first recompute_num_layers; full/uniform: every layer,
    in chunks of recompute_num_layers of which only the first keeps its input)."""
    granularity = config.recompute_granularity
    if granularity == "selective":
        modules = [m for m in ("core_attn", "mlp") if m in config.recompute_modules]
        return ["+".join(modules) or "none"] * num_local_layers
    if granularity == "full":
        if config.recompute_method == "block":
            return ["full" if i < config.recompute_num_layers else "none" for i in range(num_local_layers)]
        return ["full"] * num_local_layers
    return ["none"] * num_local_layers


def stage_activations(config: TransformerConfig, layout: str, shape: Shape) -> tuple[int, int]:
    """(bytes kept by the layers of ``layout`` (this stage's S/D string) under ``config``'s
    recomputation, bytes the backward rebuilds at once for the largest recomputed unit: what its
    layers dropped)."""
    settings = layer_recompute_settings(config, len(layout))
    kept, rebuilt = 0, 0
    chunk = config.recompute_num_layers if config.recompute_method == "uniform" else 1
    for i, (kind, setting) in enumerate(zip(layout, settings)):
        layer = sum(layer_activations(config, kind, shape, setting).values())
        if setting == "full" and chunk > 1 and i % chunk:
            layer = 0                           # inside a uniform chunk: only its first layer keeps its input
        kept += layer
        if setting != "none":               # what the backward rebuilds: the dropped part, for a whole chunk
            dropped = sum(layer_activations(config, kind, shape).values()) - \
                sum(layer_activations(config, kind, shape, setting).values())
            rebuilt = max(rebuilt, dropped * (chunk if setting == "full" else 1))
    return kept, rebuilt


def cp_exchange(config: TransformerConfig, s2: S2AttentionConfig, shape: Shape, cp_rank: int = 0,
                head_offset: int = 0) -> dict[str, int]:
    """Context parallelism, per layer per micro batch: K and V bytes this rank receives in the
    forward (sparse exchange for S layers, all-gather for both), and the backward's gradient of
    the whole-sequence K and V (2 x the saved ``kv_whole_sequence``), a transient."""
    t, cp = config.tensor_model_parallel_size, config.context_parallel_size
    if cp == 1:
        return {}
    layout = s2.to_layout(config.num_attention_heads, config.num_query_groups)
    a = activation_bytes_per_element(config)
    received = exchange_bytes(layout, CPGeometry(cp, cp_rank, shape.seq_length, s2.block_size),
                              batch=shape.micro_batch_size, kv_heads=config.num_query_groups // t,
                              head_dim=config.kv_channels, element_bytes=a, head_offset=head_offset)
    whole = 2 * shape.micro_batch_size * shape.seq_length * config.num_query_groups // t * config.kv_channels * a
    return {"received_sparse": received["sparse"], "received_all_gather": received["all_gather"],
            "kv_gradient": whole}


def dkdv_partials(config: TransformerConfig, s2: S2AttentionConfig, shape: Shape) -> int:
    """Bytes of the Triton backward's fp32 dK/dV partial buffer for the largest S-layer call of
    tensor-parallel rank 0 (``s2attn.triton_attention.dkdv_partial_bytes``: the kernel's own work
    lists; under context parallelism the last chunk, held by CP rank 0, over the whole sequence).
    0 on CPU (the torch backend) and for packed micro batches (lists per pack: not known ahead)."""
    if shape.device != "cuda" or shape.packed:
        return 0
    from s2attn.triton_attention import dkdv_partial_bytes

    t, cp = config.tensor_model_parallel_size, config.context_parallel_size
    s_kv = shape.seq_length
    s_q = s_kv // (2 * cp) if cp > 1 else s_kv
    return dkdv_partial_bytes(s2.to_layout(config.num_attention_heads, config.num_query_groups),
                              batch=shape.micro_batch_size, s_q=s_q, s_kv=s_kv,
                              heads=config.num_attention_heads // t, head_dim=config.kv_channels,
                              dtype=torch.bfloat16 if config.bf16 else config.params_dtype, q_offset=s_kv - s_q)


def gib(n: float) -> float:
    return n / 2**30


def in_flight_micro_batches(config: TransformerConfig, num_micro_batches: int, pp_rank: int = 0) -> int:
    """Micro batches whose activations a pipeline stage holds at once under 1F1B (Megatron's
    non-interleaved schedule: stage r warms up with pp - r - 1, so it holds pp - r)."""
    pp = config.pipeline_model_parallel_size
    return max(1, min(num_micro_batches, pp - pp_rank)) if pp > 1 else 1

