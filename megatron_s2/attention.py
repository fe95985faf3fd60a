"""Megatron-Core core-attention modules: S2 block-sparse (``S2CoreAttention``) and dense causal
(``DenseCoreAttention``, the CPU-capable dense path used when TransformerEngine is not).

Both take Megatron's core-attention constructor and forward signatures, so Megatron's own
``SelfAttention`` builds and calls them unchanged: q, k, v arrive as [s, b, heads, head_dim] with
this TP rank's heads (K/V with its kv groups), the output is [s, b, heads * head_dim].

Packed sequences: with Megatron's ``PackedSeqParams`` (qkv_format "thd"), q, k, v arrive as
[t, heads, head_dim] (or [t, 1, heads, head_dim]) for a pack of t tokens with document boundaries
``cu_seqlens_q`` (int32 [num_docs + 1]); each document is attended as its own sequence from
position 0 (S2 blocks relative to its first token, nothing across documents) and the output is
[t, heads * head_dim], as TransformerEngine returns it. Megatron's ``apply_rotary_pos_emb``
already restarts RoPE positions per document under thd.

Limits (each raises ValueError when asked for): causal self-attention only, no attention dropout,
no attention bias, no Megatron sliding window, vanilla softmax; packed sequences need equal
``cu_seqlens_q`` and ``cu_seqlens_kv``, no padded cu_seqlens that differ from them, and no context
parallelism. ``attention_mask`` is ignored, as TransformerEngine ignores it for
``AttnMaskType.causal``: causality comes from the mask type.

Context parallelism: each rank holds two chunks of the sequence (Megatron's order); the keys of
the other ranks arrive through ``megatron_s2.context_parallel`` (all-gather, or for S2 layers only
the blocks the pattern reads) and every local chunk attends them at its absolute offset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

from s2attn import s2_attention
from s2attn.api import document_bounds, split_documents

from .config import S2AttentionConfig, check_heads
from .context_parallel import CPGeometry, check_cp_seq_len, cp_attention


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class _CausalCoreAttention(MegatronModule):
    """Shared part: checks, this rank's head slice, and the [s, b, h, d] <-> [b, s, h, d] views."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        name = type(self).__name__
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        _require(attention_type == "self", f"{name}: attention_type must be 'self', got {attention_type!r}")
        _require(attn_mask_type == AttnMaskType.causal,
                 f"{name}: attn_mask_type must be AttnMaskType.causal, got {attn_mask_type}")
        _require(dropout == 0.0, f"{name}: attention_dropout must be 0 (not supported), got {dropout}")
        _require(config.softmax_type == "vanilla",
                 f"{name}: config.softmax_type must be 'vanilla', got {config.softmax_type!r}")
        _require(config.window_size is None,
                 f"{name}: config.window_size must be None (use the S2 layout), got {config.window_size}")
        tp_group = (pg_collection.tp if pg_collection is not None
                    else parallel_state.get_tensor_model_parallel_group())
        tp_size, tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        self.cp_group = (pg_collection.cp if pg_collection is not None
                         else parallel_state.get_context_parallel_group(check_initialized=False))
        self.cp_size, self.cp_rank = get_pg_size(self.cp_group), get_pg_rank(self.cp_group)
        check_heads(config.num_attention_heads, config.num_query_groups, tp_size)
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads // tp_size       # this rank's query heads
        self.head_offset = tp_rank * self.num_heads                  # global index of the first
        self.softmax_scale = softmax_scale                           # None: 1/sqrt(head_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type: AttnMaskType | None = None, attention_bias=None, packed_seq_params=None):
        name = type(self).__name__
        _require(attn_mask_type in (None, AttnMaskType.causal),
                 f"{name}: attn_mask_type must be causal, got {attn_mask_type}")
        _require(attention_bias is None, f"{name}: attention_bias is not supported")
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, packed_seq_params)
        s, b, heads, d = query.shape
        _require(heads == self.num_heads, f"{name}: expected {self.num_heads} query heads on this rank, got {heads}")
        q_bshd, k_bshd, v_bshd = (t.transpose(0, 1) for t in (query, key, value))
        if self.cp_size == 1:
            out_bshd = self.attend(q_bshd, k_bshd, v_bshd, 0)
        else:
            check_cp_seq_len(s * self.cp_size, self.cp_size, self.cp_block_size)
            geo = CPGeometry(self.cp_size, self.cp_rank, s * self.cp_size, self.cp_block_size)
            out_bshd = cp_attention(self.attend, q_bshd, k_bshd, v_bshd, geo, self.cp_group,
                                    layout=self.cp_layout, head_offset=self.head_offset, exchange=self.cp_exchange)
        return out_bshd.transpose(0, 1).reshape(s, b, heads * d)

    def _forward_packed(self, query, key, value, packed) -> torch.Tensor:
        """THD pack [t, heads, head_dim] (or [t, 1, heads, head_dim]) -> [t, heads * head_dim]."""
        name = type(self).__name__
        _require(packed.qkv_format == "thd",
                 f"{name}: packed_seq_params.qkv_format must be 'thd', got {packed.qkv_format!r}")
        _require(self.cp_size == 1, f"{name}: packed sequences (packed_seq_params) are not supported with "
                                    f"context parallelism (context_parallel_size {self.cp_size})")
        cu = packed.cu_seqlens_q
        for field in ("cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            other = getattr(packed, field)
            _require(other is None or other is cu or (other.shape == cu.shape and torch.equal(other, cu)),
                     f"{name}: packed_seq_params.{field} must equal cu_seqlens_q (self-attention, no padding)")
        if query.dim() == 4:
            _require(query.shape[1] == 1, f"{name}: a thd pack has batch 1, got q of shape {tuple(query.shape)}")
            query, key, value = (t.squeeze(1) for t in (query, key, value))
        t, heads, d = query.shape
        _require(heads == self.num_heads, f"{name}: expected {self.num_heads} query heads on this rank, got {heads}")
        max_seqlen = packed.max_seqlen_q if packed.max_seqlen_q is not None else packed.max_seqlen_kv
        max_seqlen = None if max_seqlen is None else int(max_seqlen)       # Megatron may hold a tensor
        return self.attend_packed(query, key, value, cu, max_seqlen).reshape(t, heads * d)

    def attend_packed(self, q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor,
                      cu_seqlens: torch.Tensor, max_seqlen: int | None) -> torch.Tensor:
        """Causal attention inside each document of a THD pack (documents by ``cu_seqlens``)."""
        raise NotImplementedError

    # Under context parallelism: the block granularity of the chunks, the S2 layout that enables
    # the sparse exchange (None: all-gather), and the exchange to use.
    cp_block_size, cp_layout, cp_exchange = 1, None, "all_gather"

    def attend(self, q_bshd: torch.Tensor, k_bshd: torch.Tensor, v_bshd: torch.Tensor, q_offset: int) -> torch.Tensor:
        """Causal attention of q (first token at absolute ``q_offset``) over keys from position 0."""
        raise NotImplementedError


class S2CoreAttention(_CausalCoreAttention):
    """S2 block-sparse causal attention through ``s2attn.s2_attention`` (Triton on CUDA, the torch
    backend elsewhere). Every global head keeps its pattern at any TP size: the kernel gets this
    rank's global head offset. GQA stays grouped (K/V are never expanded).

    Built with ``s2`` bound, e.g. ``functools.partial(S2CoreAttention, s2=config)`` in a layer spec.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, *, s2: S2AttentionConfig):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        self.s2 = s2
        self.layout = s2.to_layout(config.num_attention_heads, config.num_query_groups)
        self.cp_block_size, self.cp_layout, self.cp_exchange = s2.block_size, self.layout, s2.cp_exchange

    def attend(self, q_bshd, k_bshd, v_bshd, q_offset):
        _require(q_bshd.shape[1] % self.layout.block_size == 0,
                 f"S2CoreAttention: sequence length ({q_bshd.shape[1]}) must be a multiple of "
                 f"s2.block_size ({self.layout.block_size})")
        return s2_attention(q_bshd, k_bshd, v_bshd, self.layout, softmax_scale=self.softmax_scale,
                            head_offset=self.head_offset, q_offset=q_offset)

    def attend_packed(self, q_thd, k_thd, v_thd, cu_seqlens, max_seqlen):
        # documents need not be multiples of block_size: blocks restart at each document
        return s2_attention(q_thd, k_thd, v_thd, self.layout, softmax_scale=self.softmax_scale,
                            head_offset=self.head_offset, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                            max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


class DenseCoreAttention(_CausalCoreAttention):
    """Dense causal attention through ``torch.nn.functional.scaled_dot_product_attention`` (its
    flash kernels on CPU and CUDA); GQA via ``enable_gqa``, without expanding K/V."""

    def attend(self, q_bshd, k_bshd, v_bshd, q_offset):
        q, k, v = (t.transpose(1, 2) for t in (q_bshd, k_bshd, v_bshd))   # [b, h, s, d] views
        # Keys run from position 0 to the last query: causality aligned at the lower right.
        causal = dict(is_causal=True) if q_offset == 0 else dict(attn_mask=causal_lower_right(q.shape[2], k.shape[2]))
        out_bhsd = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale,
                                                  enable_gqa=q.shape[1] != k.shape[1], **causal)
        return out_bhsd.transpose(1, 2)

    def attend_packed(self, q_thd, k_thd, v_thd, cu_seqlens, max_seqlen):
        """One causal SDPA call per document; ``cu_seqlens`` checked (one host sync) by the same
        ``document_bounds`` as the S2 layers'."""
        documents = document_bounds(q_thd, k_thd, v_thd, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0, 0)
        parts = [self.attend(*doc, 0)[0] for doc in split_documents(documents, q_thd, k_thd, v_thd)]
        return torch.cat(parts)
