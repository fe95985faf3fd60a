"""Dense masked attention over the exact S2 token mask: the independent oracle for tests.

O(s_q * s_kv) memory and float64 arithmetic: for tests and small shapes only. For packed (THD)
documents, ``document_token_mask`` builds the whole pack's mask at once (block-diagonal over
documents, S2 blocks relative to each document's first token), independent of the per-document
path that ``s2_attention`` takes.
"""
from __future__ import annotations

import torch

from .layout import S2Layout
from .merge import safe_logsumexp


def token_mask(layout: S2Layout, s_q: int, s_kv: int, q_offset: int, kv_offset: int,
               head_offset: int, num_heads: int, device=None) -> torch.Tensor:
    """bool [heads, s_q, s_kv]: the block mask expanded to tokens, with token-level causality."""
    bs = layout.block_size
    q_pos = torch.arange(s_q, device=device) + q_offset
    k_pos = torch.arange(s_kv, device=device) + kv_offset
    blocks = layout.block_mask(-(-(s_q + q_offset) // bs), -(-(s_kv + kv_offset) // bs),
                               head_offset=head_offset, num_heads=num_heads, device=device)
    active = blocks[:, q_pos // bs][:, :, k_pos // bs]
    return active & (k_pos.view(1, 1, -1) <= q_pos.view(1, -1, 1))


def document_token_mask(layout: S2Layout, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor,
                        head_offset: int, num_heads: int) -> torch.Tensor:
    """bool [heads, total_q, total_kv] of a pack: query t and key u see each other iff they lie in
    the same document, u's position in it is <= t's, and the layout's block pattern (blocks counted
    from the document's first token) is active. cu_seqlens_*: int [num_docs + 1]."""
    device = cu_seqlens_q.device
    def positions(cu):      # (document index, position inside the document) of every token
        lengths = (cu[1:] - cu[:-1]).long()
        doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        return doc, torch.arange(doc.numel(), device=device) - cu[:-1].long()[doc]
    q_doc, q_pos = positions(cu_seqlens_q)
    k_doc, k_pos = positions(cu_seqlens_kv)
    bs = layout.block_size
    longest = max(int(q_pos.max()) + 1 if q_pos.numel() else 0, int(k_pos.max()) + 1 if k_pos.numel() else 0)
    n = max(1, -(-longest // bs))
    blocks = layout.block_mask(n, n, head_offset=head_offset, num_heads=num_heads, device=device)
    active = blocks[:, q_pos // bs][:, :, k_pos // bs]
    same_doc = q_doc.view(-1, 1) == k_doc.view(1, -1)
    return active & same_doc & (k_pos.view(1, -1) <= q_pos.view(-1, 1))


def masked_attention(q, k, v, mask: torch.Tensor, softmax_scale: float):
    """Softmax attention of q [b, s_q, h, d] over k, v [b, s_kv, kv_heads, d] (each kv head
    repeated to its h // kv_heads query heads) where ``mask`` (bool [h, s_q, s_kv]) is True, in
    float64. Returns (out [b, s_q, h, d] in q's dtype, lse [b, h, s_q] float32, float64 for
    float64 q); a row with no key gets out 0 and lse -inf. Differentiable in q, k, v."""
    group = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))          # [b, h, s, d]
    k64, v64 = k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1)
    scores = (q64 @ k64.transpose(-1, -2)) * softmax_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = safe_logsumexp(scores, dim=-1)                                     # -inf on empty rows
    seen = torch.isfinite(lse)
    probs = torch.where(mask, torch.exp(scores - torch.where(seen, lse, 0.0).unsqueeze(-1)), 0.0)
    out = (probs @ v64).transpose(1, 2).to(q.dtype)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def reference_attention(q, k, v, layout: S2Layout, softmax_scale: float, head_offset: int,
                        q_offset: int, kv_offset: int):
    """``masked_attention`` over the layout's token mask: (out [b, s_q, h, d] in q's dtype,
    lse [b, h, s_q] float32, float64 for float64 q); differentiable in both."""
    mask = token_mask(layout, q.shape[1], k.shape[1], q_offset, kv_offset, head_offset, q.shape[2],
                      device=q.device)
    return masked_attention(q, k, v, mask, softmax_scale)


def reference_document_attention(q, k, v, layout: S2Layout, softmax_scale: float, head_offset: int,
                                 cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor):
    """``masked_attention`` of a THD pack (q [total_q, h, d], k, v [total_kv, kv_heads, d]) over
    ``document_token_mask``: (out [total_q, h, d] in q's dtype, lse [h, total_q] float32, float64
    for float64 q); differentiable in q, k, v."""
    mask = document_token_mask(layout, cu_seqlens_q, cu_seqlens_kv, head_offset, q.shape[1])
    out, lse = masked_attention(q[None], k[None], v[None], mask, softmax_scale)
    return out[0], lse[0]
