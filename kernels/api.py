"""``s2_attention``: one entry point that validates its input and dispatches to a backend.

Every backend has the signature ``fn(q, k, v, layout, softmax_scale, head_offset, q_offset,
kv_offset) -> (out, lse)`` and is differentiable in q, k, v through both outputs. Empty inputs (no
query, or no key) are answered here, the same whatever the backend, so backends see only
non-empty ones.
"""
from __future__ import annotations

import math

import torch

from .layout import S2Layout

BACKENDS = ("auto", "triton", "torch", "reference")


def _backend_fn(name: str):
    if name == "triton":
        from .triton_attention import triton_attention
        return triton_attention
    if name == "torch":
        from .torch_attention import torch_attention
        return torch_attention
    from .reference import reference_attention
    return reference_attention


def _triton_supports(dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
    """The dtypes and shapes the Triton kernels are built for; "auto" uses the torch path for the
    rest (e.g. float64)."""
    from .triton_attention import BLOCK_SIZES, DTYPES, HEAD_DIMS
    return dtype in DTYPES and head_dim in HEAD_DIMS and block_size in BLOCK_SIZES


class _NoKeySeen(torch.autograd.Function):
    """Attention with no query or no key: out 0 (empty without queries), lse -inf, zero gradients."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        b, s_q, heads, _ = q.shape
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32   # as the backends
        return q.new_zeros(q.shape), q.new_full((b, heads, s_q), float("-inf"), dtype=lse_dtype)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        return tuple(torch.zeros_like(t) for t in ctx.saved_tensors)


def _validate(q, k, v, layout, head_offset, q_offset, kv_offset, backend) -> None:
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(isinstance(layout, S2Layout), f"layout must be an S2Layout, got {type(layout).__name__}")
    need(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        need(isinstance(t, torch.Tensor) and t.dim() == 4,
             f"{name} must be a 4-d tensor [batch, seq, heads, head_dim], got "
             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        need(t.is_floating_point(), f"{name} must be floating point, got dtype {t.dtype}")
    need(k.shape == v.shape, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    need(q.dtype == k.dtype == v.dtype, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    need(q.device == k.device == v.device,
         f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    need(q.shape[0] == k.shape[0], f"batch of q ({q.shape[0]}) and k ({k.shape[0]}) must match")
    need(q.shape[3] == k.shape[3], f"head_dim of q ({q.shape[3]}) and k ({k.shape[3]}) must match")
    heads, kv_heads = q.shape[2], k.shape[2]
    need(heads % kv_heads == 0, f"q heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    need(heads // kv_heads == layout.group_size,
         f"q heads / kv heads ({heads}/{kv_heads}) must equal the layout's group size "
         f"({layout.num_heads}/{layout.num_kv_heads})")
    need(isinstance(head_offset, int) and head_offset >= 0 and head_offset % layout.group_size == 0
         and head_offset + heads <= layout.num_heads,
         f"head_offset ({head_offset!r}) must be a multiple of the group size ({layout.group_size}) "
         f"with head_offset + heads ({heads}) <= layout.num_heads ({layout.num_heads})")
    for name, off in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        need(isinstance(off, int) and off >= 0 and off % layout.block_size == 0,
             f"{name} must be a non-negative multiple of block_size ({layout.block_size}), got {off!r}")


def s2_attention(q, k, v, layout: S2Layout, softmax_scale: float | None = None, head_offset: int = 0,
                 q_offset: int = 0, kv_offset: int = 0, return_lse: bool = False, backend: str = "auto"):
    """S2 block-sparse causal attention.

    q: [batch, s_q, heads, head_dim]; k, v: [batch, s_kv, kv_heads, head_dim] (any strides).
    head_offset: global index of q's first head. q_offset / kv_offset: absolute position of the
    first query / key token (multiples of block_size). Returns out like q, and with ``return_lse``
    also lse [batch, heads, s_q], float32 (float64 for float64 inputs); natural log.

    A query that sees no key gets out 0 and lse -inf; so do all queries when s_kv is 0, and batch 0
    or s_q 0 give empty out and lse, on every backend. backend "auto": Triton for CUDA tensors of a
    dtype, head_dim and block_size the kernels are built for (``_triton_supports``), else torch.
    Bad input raises ValueError naming it.
    """
    _validate(q, k, v, layout, head_offset, q_offset, kv_offset, backend)
    if min(q.shape[0], q.shape[1], k.shape[1]) == 0:
        out, lse = _NoKeySeen.apply(q, k, v)
        return (out, lse) if return_lse else out
    if backend == "auto":
        backend = ("triton" if q.is_cuda and _triton_supports(q.dtype, q.shape[-1], layout.block_size)
                   else "torch")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _backend_fn(backend)(q, k, v, layout, float(softmax_scale), head_offset, q_offset, kv_offset)
    return (out, lse) if return_lse else out
