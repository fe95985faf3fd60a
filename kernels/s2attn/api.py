"""``s2_attention``: one entry point that validates its input and dispatches to a backend.

Every backend has the signature ``fn(q, k, v, layout, softmax_scale, head_offset, q_offset,
kv_offset) -> (out, lse)`` and is differentiable in q, k, v through both outputs. Empty inputs (no
query, or no key) are answered here, the same whatever the backend, so backends see only
non-empty ones. Packed (THD) input with ``cu_seqlens`` is answered here too: the Triton backend
runs all documents in one launch per kernel (``triton_packed_attention``); the others run each
document on its own slice, so they support packing unchanged.
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


def document_bounds(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, q_offset, kv_offset):
    """Check packed (THD) input (ValueError naming the argument); return [(q_start, q_end,
    kv_start, kv_end)] per document. Also serves dense attention over the same packs.

    One host sync: both ``cu_seqlens`` are read back to the host with a single ``.tolist()``.
    """
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(cu_seqlens_q is not None and cu_seqlens_kv is not None,
         "cu_seqlens_q and cu_seqlens_kv must be given together (both None for [batch, seq, heads, head_dim] input)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        need(isinstance(t, torch.Tensor) and t.dim() == 3,
             f"{name} must be a 3-d tensor [total_tokens, heads, head_dim] with cu_seqlens, got "
             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    need(q_offset == 0 and kv_offset == 0,
         f"q_offset and kv_offset must be 0 with cu_seqlens (every document starts at position 0), "
         f"got {q_offset!r} and {kv_offset!r}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_kv", cu_seqlens_kv)):
        need(isinstance(cu, torch.Tensor), f"{name} must be a tensor, got {type(cu).__name__}")
        need(cu.dtype == torch.int32, f"{name} must be int32, got {cu.dtype}")
        need(cu.device == q.device, f"{name} must be on q's device ({q.device}), got {cu.device}")
        need(cu.dim() == 1 and cu.numel() >= 2, f"{name} must be 1-d [num_docs + 1] with num_docs >= 1, "
                                                f"got shape {tuple(cu.shape)}")
    need(cu_seqlens_q.numel() == cu_seqlens_kv.numel(),
         f"cu_seqlens_q and cu_seqlens_kv must count the same documents, got {cu_seqlens_q.numel() - 1} "
         f"and {cu_seqlens_kv.numel() - 1}")
    cu_q, cu_kv = torch.stack((cu_seqlens_q, cu_seqlens_kv)).tolist()          # the host sync
    for name, cu, total, max_name, max_len in (("cu_seqlens_q", cu_q, q.shape[0], "max_seqlen_q", max_seqlen_q),
                                               ("cu_seqlens_kv", cu_kv, k.shape[0], "max_seqlen_kv", max_seqlen_kv)):
        need(cu[0] == 0, f"{name} must start at 0, got {cu[0]}")
        drop = next((i for i in range(len(cu) - 1) if cu[i] > cu[i + 1]), None)
        if drop is not None:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{drop}]={cu[drop]} > "
                             f"{name}[{drop + 1}]={cu[drop + 1]}")
        need(cu[-1] == total, f"{name} must end at the token count ({total}), got {cu[-1]}")
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        need(max_len is None or (isinstance(max_len, int) and max_len >= longest),
             f"{max_name} must be None or an int >= the longest document ({longest}), got {max_len!r}")
    return list(zip(cu_q[:-1], cu_q[1:], cu_kv[:-1], cu_kv[1:]))


def split_documents(documents, q, k, v) -> list:
    """Each document's (q, k, v), [1, tokens, heads, head_dim] views of the packed [total_tokens,
    heads, head_dim] tensors, for ``documents`` from ``document_bounds``. One ``split`` per tensor:
    its backward gathers every document's gradient into one tensor, where slicing document by
    document would build a whole-pack gradient for each."""
    q_docs = q.split([q1 - q0 for q0, q1, _, _ in documents])
    k_docs, v_docs = (t.split([k1 - k0 for _, _, k0, k1 in documents]) for t in (k, v))
    return [(qd[None], kd[None], vd[None]) for qd, kd, vd in zip(q_docs, k_docs, v_docs)]


def _attend(q, k, v, layout, softmax_scale, head_offset, q_offset, kv_offset, backend):
    """(out, lse) of validated [b, s, h, d] input: empty input answered here, else the backend."""
    if min(q.shape[0], q.shape[1], k.shape[1]) == 0:
        return _NoKeySeen.apply(q, k, v)
    return _backend_fn(backend)(q, k, v, layout, softmax_scale, head_offset, q_offset, kv_offset)


def s2_attention(q, k, v, layout: S2Layout, softmax_scale: float | None = None, head_offset: int = 0,
                 q_offset: int = 0, kv_offset: int = 0, return_lse: bool = False, backend: str = "auto",
                 cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_kv: torch.Tensor | None = None,
                 max_seqlen_q: int | None = None, max_seqlen_kv: int | None = None):
    """S2 block-sparse causal attention.

    q: [batch, s_q, heads, head_dim]; k, v: [batch, s_kv, kv_heads, head_dim] (any strides).
    head_offset: global index of q's first head. q_offset / kv_offset: absolute position of the
    first query / key token (multiples of block_size). Returns out like q, and with ``return_lse``
    also lse [batch, heads, s_q], float32 (float64 for float64 inputs); natural log.

    Packed documents (THD, FlashAttention's varlen convention): with ``cu_seqlens_q`` and
    ``cu_seqlens_kv`` (int32 [num_docs + 1] on q's device, cumulative token counts from 0 to the
    token count), q is [total_q, heads, head_dim], k, v [total_kv, kv_heads, head_dim], out is
    like q and lse [heads, total_q]. Document i is q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] against
    the same slice of k, v by cu_seqlens_kv, attended exactly as its own sequence starting at
    position 0: S2 blocks start at its first token, causality holds inside it, nothing crosses a
    document boundary. Zero-length documents (repeated entries) are allowed; a query document
    whose key document is empty gets out 0, lse -inf. q_offset and kv_offset must be 0.
    max_seqlen_q / max_seqlen_kv (optional, FlashAttention's names) must bound the longest
    document. Cost: one host sync (cu_seqlens read back once, for the checks and the lengths);
    work is the sum of per-document work, less than the unmasked pack. Triton: one launch per
    kernel for the whole pack (its grid covers (document, tile) pairs, so short documents take
    few programs), with work lists built on the host from the tuple of lengths and cached on it;
    a new tuple costs their build and copies to the device, which wait for it (a sync per kernel
    tile shape). Other backends: each document runs on a [1, len, heads, head_dim] view of its
    slice (no copy), and the results are concatenated.

    A query that sees no key gets out 0 and lse -inf; so do all queries when s_kv is 0, and batch 0
    or s_q 0 give empty out and lse, on every backend. backend "auto": Triton for CUDA tensors of a
    dtype, head_dim and block_size the kernels are built for (``_triton_supports``), else torch.
    Bad input raises ValueError naming it (the offending cu_seqlens argument included).
    """
    packed = cu_seqlens_q is not None or cu_seqlens_kv is not None
    if packed:
        documents = document_bounds(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
                                     q_offset, kv_offset)
        _validate(q[None], k[None], v[None], layout, head_offset, q_offset, kv_offset, backend)
    else:
        if max_seqlen_q is not None or max_seqlen_kv is not None:
            raise ValueError(f"max_seqlen_q and max_seqlen_kv ({max_seqlen_q!r}, {max_seqlen_kv!r}) go with "
                             "cu_seqlens_q and cu_seqlens_kv; leave them None for [batch, seq, heads, head_dim] input")
        _validate(q, k, v, layout, head_offset, q_offset, kv_offset, backend)
    if backend == "auto":
        backend = ("triton" if q.is_cuda and _triton_supports(q.dtype, q.shape[-1], layout.block_size)
                   else "torch")
    softmax_scale = float(1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale)
    if not packed:
        out, lse = _attend(q, k, v, layout, softmax_scale, head_offset, q_offset, kv_offset, backend)
        return (out, lse) if return_lse else out
    if backend == "triton" and q.shape[0] > 0 and k.shape[0] > 0:
        from .triton_attention import triton_packed_attention
        q_lengths, kv_lengths = zip(*[(q1 - q0, k1 - k0) for q0, q1, k0, k1 in documents])
        out, lse = triton_packed_attention(q, k, v, layout, softmax_scale, head_offset, cu_seqlens_q, cu_seqlens_kv,
                                           q_lengths, kv_lengths)
        return (out, lse) if return_lse else out
    parts = [_attend(*doc, layout, softmax_scale, head_offset, 0, 0, backend)
             for doc in split_documents(documents, q, k, v)]
    out = torch.cat([o[0] for o, _ in parts])                   # [total_q, heads, head_dim]
    lse = torch.cat([l[0] for _, l in parts], dim=1)            # [heads, total_q]
    return (out, lse) if return_lse else out
