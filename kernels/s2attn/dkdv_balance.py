"""How evenly the Triton backward's dK/dV work spreads over a GPU, from the sparse index alone.

Library side of ``scripts/dkdv_balance.py``; needs triton (for the index) but no GPU. For one
attention call (one TP rank's heads, one micro-batch) it compares

* before: one dK/dV program per (kv head, kv tile), walking the whole work of the tile (the
  visited query tiles of every query head of its kv head), idle tiles included;
* after: the chunk programs of ``triton_attention._DkdvWork`` plus the reduce programs of split
  tiles.

and predicts the backward's time with a simple model: programs run in launch order on
``num_sms`` SMs, one at a time each (the dK/dV kernel's 227 registers x 8 warps fill an SM), a
free SM takes the next program (greedy list scheduling); the dQ kernel runs first, the reduce
kernel after the dK/dV kernel. A program's time is its matmul FLOPs at ``flops_per_s / num_sms``
plus the bytes of its partial dK/dV (written, then read by the reduce) at
``bytes_per_s / num_sms``. The defaults (400 TFLOP/s of dense bf16 matmuls over an H100 SXM,
3 TB/s of HBM) are assumptions, not measurements: the ratios matter, not the milliseconds.
"""
from __future__ import annotations

import heapq

import torch

from .layout import S2Layout
from .triton_attention import _dkdv_work, _sparse_index, _tile_work, tile_configs

H100_SMS = 132


def makespan(costs: list[float], workers: int) -> float:
    """Finish time of ``costs`` (in launch order) on ``workers`` identical workers, each free worker
    taking the next job (greedy list scheduling, as a GPU's block scheduler does)."""
    free = [0.0] * workers
    for cost in costs:
        heapq.heapreplace(free, free[0] + cost)
    return max(free)


def dkdv_balance(layout: S2Layout, seq_len: int, head_offset: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, num_sms: int = H100_SMS,
                 flops_per_s: float = 400e12, bytes_per_s: float = 3e12) -> dict:
    """Balance of the dK/dV programs of one self-attention call of ``seq_len`` tokens (batch 1)
    over query heads [head_offset, +num_heads), before and after splitting.

    Returns a dict: ``chunk_bound``; for "before" and "after": ``programs``, ``heaviest`` and
    ``mean`` (query tiles visited per program), ``ratio`` (heaviest / mean) and ``dkdv_ms``
    (modelled makespan; "after" includes the reduce kernel, also given as ``reduce_ms``);
    ``dq_ms`` and ``backward_ratio`` (modelled dQ + dK/dV time before / after).
    """
    cfg = tile_configs(head_dim, layout.block_size, dtype)
    kv, dq = cfg.backward_dkdv, cfg.backward_dq
    cpu = torch.device("cpu")
    index, work = _dkdv_work(layout, seq_len, seq_len, 0, 0, head_offset, num_heads, kv.block_m, kv.block_n,
                             None, cpu)
    group = layout.group_size
    kv_heads = (head_offset + num_heads - 1) // group - head_offset // group + 1
    tiles = _tile_work(index.bounds, kv_heads, head_offset % group, group)       # [kv_heads, kv tiles]

    sm_flops, sm_bytes = flops_per_s / num_sms, bytes_per_s / num_sms
    visit_s = 8 * kv.block_m * kv.block_n * head_dim / sm_flops                  # 4 matmuls per visit
    partial_s = 2 * (2 * kv.block_n * head_dim * 4) / sm_bytes                   # dK+dV fp32, written and read
    before = tiles.flatten().tolist()                   # launch order: kv tiles fastest (grid axis 0)
    chunks = work.chunks.long()
    after = (chunks[:, 3] - chunks[:, 2]).tolist()
    split = (chunks[:, 4] >= 0).tolist()
    after_s = [w * visit_s + (partial_s / 2 if s else 0.0) for w, s in zip(after, split)]
    reduce_s = [n * partial_s / 2 for n in work.reduce[:, 3].tolist()]

    dq_index = _sparse_index(layout, seq_len, seq_len, 0, 0, head_offset, num_heads, dq.block_m, dq.block_n,
                             False, cpu)
    dq_visits = (dq_index.bounds[..., 2] - dq_index.bounds[..., 0]).flatten().tolist()   # head-major launch
    dq_ms = makespan([w * 6 * dq.block_m * dq.block_n * head_dim / sm_flops for w in dq_visits], num_sms) * 1e3

    def summary(visits: list[int], seconds: list[float]) -> dict:
        mean = sum(visits) / len(visits)
        return {"programs": len(visits), "heaviest": max(visits), "mean": mean, "ratio": max(visits) / mean,
                "dkdv_ms": makespan(seconds, num_sms) * 1e3}

    result = {"chunk_bound": work.chunk_bound, "before": summary(before, [w * visit_s for w in before]),
              "after": summary(after, after_s), "dq_ms": dq_ms}
    result["after"]["reduce_ms"] = makespan(reduce_s, num_sms) * 1e3 if reduce_s else 0.0
    result["after"]["dkdv_ms"] += result["after"]["reduce_ms"]
    result["backward_ratio"] = (dq_ms + result["before"]["dkdv_ms"]) / (dq_ms + result["after"]["dkdv_ms"])
    return result
