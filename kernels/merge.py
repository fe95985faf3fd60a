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

    outs: list of [b, s, h, d]; lses: list of float32 [b, h, s], each over a disjoint key set.
    Returns the attention over the union of the keys (and its lse when ``return_lse``).
    Rows that no part saw stay 0 with lse -inf. Differentiable in every input.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs and lses must be non-empty lists of equal length, "
                         f"got {len(outs)} and {len(lses)}")
    lse_pbhs = torch.stack(lses).float()                                # [parts, b, h, s]
    lse_bhs = safe_logsumexp(lse_pbhs, dim=0)
    seen = torch.isfinite(lse_bhs)
    weights = torch.where(seen, torch.exp(lse_pbhs - torch.where(seen, lse_bhs, 0.0)), 0.0)
    out = sum(o.float() * w.transpose(1, 2).unsqueeze(-1) for o, w in zip(outs, weights))
    out = out.to(outs[0].dtype)
    return (out, lse_bhs) if return_lse else out
