"""Combine attention results computed over disjoint sets of keys, using their log-sum-exps."""
from __future__ import annotations

import torch


def safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that returns -inf for all -inf slices with a zero (not NaN) gradient there."""
    top = x.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0).detach()
    total = torch.exp(x - top).sum(dim=dim)
    seen = total > 0
    lse = torch.log(torch.where(seen, total, 1.0)) + top.squeeze(dim)
    return torch.where(seen, lse, float("-inf"))


def merge_attention(outs, lses, return_lse: bool = False):
    """Merge partial attention outputs.

    outs: list of [b, s, h, d]; lses: list of [b, h, s] (as ``s2_attention`` returns them: float32,
    float64 for float64 inputs), each over a disjoint key set. Returns the attention over the union
    of the keys in the outs' dtype (and its lse when ``return_lse``). The merge runs in float64 when
    any out or lse is float64, else in float32, and the lse comes back in that dtype: merging
    float64 parts equals the attention over the union to float64 rounding. Rows that no part saw
    stay 0 with lse -inf. Differentiable in every input.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs and lses must be non-empty lists of equal length, "
                         f"got {len(outs)} and {len(lses)}")
    wide = any(t.dtype == torch.float64 for t in (*outs, *lses))
    dtype = torch.float64 if wide else torch.float32
    lse_pbhs = torch.stack(lses).to(dtype)                              # [parts, b, h, s]
    lse_bhs = safe_logsumexp(lse_pbhs, dim=0)
    seen = torch.isfinite(lse_bhs)
    weights = torch.where(seen, torch.exp(lse_pbhs - torch.where(seen, lse_bhs, 0.0)), 0.0)
    out = sum(o.to(dtype) * w.transpose(1, 2).unsqueeze(-1) for o, w in zip(outs, weights))
    out = out.to(outs[0].dtype)
    return (out, lse_bhs) if return_lse else out
