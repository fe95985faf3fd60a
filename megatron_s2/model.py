"""Hybrid S2/dense GPT models through Megatron-Core's layer specs.

``get_gpt_s2_layer_specs`` takes Megatron's own GPT layer spec (TransformerEngine's when TE is
installed and allowed, the local one otherwise) and swaps the ``core_attention`` of each layer:
``S2CoreAttention`` on ``S`` layers; TE's attention (or our ``DenseCoreAttention``) on ``D`` layers.
In the local spec the norms become ``megatron_s2.norm.Norm`` (Megatron's torch norm refuses
sequence parallelism). Linear layers, MLP and Megatron's ``SelfAttention`` stay Megatron's.
``build_gpt_model`` validates everything first, builds the ``GPTModel``, and gives it our
device-agnostic RoPE.

Limits: standard self-attention GPT layers only (no MoE, no multi-latent attention).
"""
from __future__ import annotations

import functools

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt import gpt_layer_specs as megatron_specs
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .attention import DenseCoreAttention, S2CoreAttention
from .config import SPARSE, S2AttentionConfig, check_heads, check_layout, validate_hybrid_model
from .norm import Norm
from .recompute import IMPLEMENTATIONS, apply_torch_recompute, without_recompute
from .rope import PortableRotaryEmbedding


def _resolve_use_te(use_te: bool | None) -> bool:
    if use_te is None:
        return megatron_specs.HAVE_TE
    if use_te and not megatron_specs.HAVE_TE:
        raise ValueError("use_te=True but TransformerEngine is not installed")
    return bool(use_te)


def _layer_spec(config: TransformerConfig, use_te: bool, core_attention) -> ModuleSpec:
    """Megatron's GPT layer spec for this config with ``core_attention`` (and the local norms) swapped in."""
    if use_te:
        spec = megatron_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = megatron_specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm,
                                                       normalization=config.normalization)
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = Norm
        if config.qk_layernorm:
            attention = spec.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = Norm
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def _stage_layer_ids(config: TransformerConfig, vp_stage: int | None, pp_rank: int | None) -> list[int]:
    """0-based global numbers of the layers this pipeline stage builds (as Megatron slices them)."""
    if config.pipeline_model_parallel_layout is not None:
        return list(config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank))
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)))


def get_gpt_s2_layer_specs(config: TransformerConfig, s2: S2AttentionConfig, layout: str, *,
                           use_te: bool | None = None, vp_stage: int | None = None,
                           pp_rank: int | None = None, recompute_impl: str = "megatron") -> TransformerBlockSubmodules:
    """One layer spec per layer of this pipeline stage, for ``GPTModel(transformer_layer_spec=...)``.

    ``layout`` holds one S/D character per global layer. ``use_te``: None uses TransformerEngine
    when installed; False forces the local (CPU-capable) modules. ``recompute_impl="torch"`` puts
    ``config``'s activation recomputation into the specs (``megatron_s2.recompute``; the model must
    then get ``without_recompute(config)``); "megatron" leaves it to Megatron's modules.
    """
    if recompute_impl not in IMPLEMENTATIONS:
        raise ValueError(f"recompute_impl must be one of {IMPLEMENTATIONS}, got {recompute_impl!r}")
    if config.multi_latent_attention or config.num_moe_experts is not None:
        raise ValueError(f"S2 layer specs support dense self-attention GPT layers only, got "
                         f"multi_latent_attention={config.multi_latent_attention}, "
                         f"num_moe_experts={config.num_moe_experts}")
    check_layout(layout, config.num_layers)
    check_heads(config.num_attention_heads, config.num_query_groups, config.tensor_model_parallel_size)
    use_te = _resolve_use_te(use_te)
    if use_te:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention, TENorm
        dense_attention, final_norm = TEDotProductAttention, TENorm
    else:
        dense_attention, final_norm = DenseCoreAttention, Norm
    sparse_spec = _layer_spec(config, use_te, functools.partial(S2CoreAttention, s2=s2))
    dense_spec = _layer_spec(config, use_te, dense_attention)
    layer_specs = [sparse_spec if layout[i] == SPARSE else dense_spec
                   for i in _stage_layer_ids(config, vp_stage, pp_rank)]
    if recompute_impl == "torch" and config.recompute_granularity is not None:
        layer_specs = apply_torch_recompute(config, layer_specs)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)


def build_gpt_model(config: TransformerConfig, s2: S2AttentionConfig, layout: str, *, vocab_size: int,
                    max_sequence_length: int, position_embedding_type: str = "rope",
                    use_te: bool | None = None, pre_process: bool = True, post_process: bool = True,
                    share_embeddings_and_output_weights: bool = False, rotary_base: int = 10000,
                    rope_scaling: bool = False, rope_scaling_factor: float = 8.0,
                    vp_stage: int | None = None, recompute_impl: str = "megatron") -> GPTModel:
    """A ``GPTModel`` whose layers follow ``layout``, after every check that needs no model.

    ``max_sequence_length`` is the training sequence length (a multiple of the S2 block size).
    Without CUDA, ``config.use_cpu_initialization`` must be set (Megatron allocates on the GPU
    otherwise). With ``position_embedding_type="rope"`` the model gets ``PortableRotaryEmbedding``
    on the device of its parameters. ``rope_scaling``/``rope_scaling_factor`` are Megatron's Llama-3.x
    RoPE frequency scaling (low/high frequency factors 1 and 4 over 8192 original positions).

    Activation recomputation follows ``config.recompute_granularity`` / ``recompute_method`` /
    ``recompute_num_layers`` / ``recompute_modules``. ``recompute_impl="megatron"``: Megatron's
    own (``tensor_parallel.checkpoint``: CUDA only); ``"torch"``: ours (``megatron_s2.recompute``,
    any device; the model's config is then ``without_recompute(config)``).
    """
    validate_hybrid_model(num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
                          num_query_groups=config.num_query_groups,
                          tensor_model_parallel_size=config.tensor_model_parallel_size,
                          seq_length=max_sequence_length, s2=s2, layout=layout,
                          context_parallel_size=config.context_parallel_size)
    if not torch.cuda.is_available() and not config.use_cpu_initialization:
        raise ValueError("config.use_cpu_initialization must be True without CUDA, got False")
    spec = get_gpt_s2_layer_specs(config, s2, layout, use_te=use_te, vp_stage=vp_stage,
                                  recompute_impl=recompute_impl)
    if recompute_impl == "torch":
        config = without_recompute(config)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length, pre_process=pre_process,
                     post_process=post_process,
                     share_embeddings_and_output_weights=share_embeddings_and_output_weights,
                     position_embedding_type=position_embedding_type, rotary_base=rotary_base,
                     rope_scaling=rope_scaling, rope_scaling_factor=rope_scaling_factor, vp_stage=vp_stage)
    if position_embedding_type == "rope":
        device = next(model.parameters()).device
        model.rotary_pos_emb = PortableRotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0,
            rotary_interleaved=config.rotary_interleaved, rotary_base=rotary_base,
            rope_scaling=rope_scaling, rope_scaling_factor=rope_scaling_factor,
            cp_group=model.pg_collection.cp, device=device)
    return model
