"""Dense masked attention over the exact S2 token mask: the independent oracle for tests.

O(s_q * s_kv) memory and float64 arithmetic: for tests and small shapes only.
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
