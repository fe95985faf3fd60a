"""Context parallelism: a sequence split over ``cp`` ranks, attention equal to the unsplit run.

Megatron's order: the sequence is cut into 2*cp chunks and rank r holds chunks r and 2*cp-1-r
(this balances causal work). A rank's queries need the keys before them, held by other ranks.
Two ways to bring them, one autograd function each (the backward sends dK/dV to the owners):

* ``all_gather``: every rank gathers all K/V (baseline; also the only choice for dense layers);
* ``sparse``: a rank receives only the key blocks its queries attend under the S2 layout: the local
  window before each chunk and each head's strided blocks, older than its queries; for a kv head,
  the union of the blocks its query heads read (they differ under per-query-head sharding). What
  each rank needs is computed from the layout on every rank alike, so no metadata is exchanged.

Then each local query chunk attends the keys up to its end with absolute offsets (``q_offset``),
through any ``attend(q, k, v, q_offset)`` function. Blocks that were not received are zeros that
the S2 pattern never reads.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from s2attn import S2Layout

EXCHANGES = ("sparse", "all_gather")

# torch 2.13 renamed the single-tensor collectives (the old names warn that they are deprecated);
# the GPU machine's torch 2.11 has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class CPGeometry:
    """Where this rank's tokens sit in the global sequence."""
    cp_size: int
    cp_rank: int
    seq_len: int          # global sequence length
    block_size: int

    @property
    def chunk_len(self) -> int:
        return self.seq_len // (2 * self.cp_size)

    @property
    def chunk_blocks(self) -> int:
        return self.chunk_len // self.block_size

    def chunk_ids(self, rank: int | None = None) -> tuple[int, int]:
        rank = self.cp_rank if rank is None else rank
        return rank, 2 * self.cp_size - 1 - rank

    def owner(self, chunk: int) -> tuple[int, int]:
        """(rank holding the chunk, its position 0/1 in that rank's local sequence)."""
        return (chunk, 0) if chunk < self.cp_size else (2 * self.cp_size - 1 - chunk, 1)


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """long [seq_len / cp_size]: the positions a CP rank holds, in its local order (chunks r and
    2*cp-1-r of 2*cp)."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of 2 * cp_size ({2 * cp_size})")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(chunk, device=device)
    return torch.cat([first + cp_rank * chunk, first + (2 * cp_size - 1 - cp_rank) * chunk])


def check_cp_seq_len(seq_len: int, cp_size: int, block_size: int) -> None:
    if seq_len % (2 * cp_size * block_size):
        raise ValueError(f"seq_length ({seq_len}) must be a multiple of 2 * context_parallel_size * block_size "
                         f"(2 * {cp_size} * {block_size} = {2 * cp_size * block_size})")


def split_batch_for_cp(batch: dict, cp_size: int, cp_rank: int, seq_dim: int = 1) -> dict:
    """This rank's share of every [.., seq, ..] tensor in ``batch`` (tokens, labels, loss mask,
    positions), in Megatron's order; other entries pass through."""
    if cp_size == 1:
        return batch
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() <= seq_dim:
            out[key] = value
            continue
        positions = context_parallel_positions(value.shape[seq_dim], cp_size, cp_rank, value.device)
        out[key] = value.index_select(seq_dim, positions)
    return out


# -- which key blocks a rank needs ---------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def needed_key_blocks(layout: S2Layout, geo: CPGeometry, rank: int, head_offset: int, kv_heads: int) -> torch.Tensor:
    """bool [kv_heads, total blocks]: the key blocks ``rank``'s queries attend, per local kv head
    (the union over its query heads)."""
    total = geo.seq_len // geo.block_size
    heads = kv_heads * layout.group_size
    need = torch.zeros(heads, total, dtype=torch.bool)
    for chunk in geo.chunk_ids(rank):
        mask = layout.block_mask(geo.chunk_blocks, total, q_block_offset=chunk * geo.chunk_blocks,
                                 head_offset=head_offset, num_heads=heads)
        need |= mask.any(dim=1)
    return need.view(kv_heads, layout.group_size, total).any(dim=1)


@functools.lru_cache(maxsize=32)
def _sparse_plan(layout: S2Layout, geo: CPGeometry, head_offset: int, kv_heads: int):
    """Per (sender, receiver): the (local block, kv head) pairs the sender ships, and where they land
    as (global block, kv head) on the receiver. Identical on every rank."""
    send = {}   # (p, r) -> (local blocks, heads, global blocks)
    for r in range(geo.cp_size):
        need = needed_key_blocks(layout, geo, r, head_offset, kv_heads)
        heads, blocks = need.nonzero(as_tuple=True)
        chunk = blocks // geo.chunk_blocks
        for p in range(geo.cp_size):
            if p == r:
                continue
            mine = torch.tensor([geo.owner(int(c))[0] == p for c in chunk], dtype=torch.bool)
            pos = torch.tensor([geo.owner(int(c))[1] for c in chunk[mine]], dtype=torch.long)
            local = pos * geo.chunk_blocks + blocks[mine] % geo.chunk_blocks
            send[p, r] = (local, heads[mine], blocks[mine])
    return send


def exchange_bytes(layout: S2Layout | None, geo: CPGeometry, *, batch: int, kv_heads: int, head_dim: int,
                   element_bytes: int, head_offset: int = 0) -> dict:
    """Bytes of K and V one rank receives per layer per forward (the backward returns as many),
    for the all-gather and, given a layout, the sparse exchange."""
    block_bytes = 2 * batch * geo.block_size * head_dim * element_bytes            # K and V
    local_blocks = 2 * geo.chunk_blocks * kv_heads
    out = {"all_gather": (geo.cp_size - 1) * local_blocks * block_bytes}
    if layout is not None:
        plan = _sparse_plan(layout, geo, head_offset, kv_heads)
        out["sparse"] = sum(len(plan[p, geo.cp_rank][0]) for p in range(geo.cp_size) if p != geo.cp_rank) * block_bytes
    return out


def cp_exchange_report(config, s2, layout: str, seq_len: int, micro_batch_size: int, cp_rank: int,
                       head_offset: int = 0) -> str:
    """One line for the training log: K/V bytes this rank receives per layer per micro-batch forward
    (the backward returns as many) under each exchange, for the S and the D layers."""
    tp, cp = config.tensor_model_parallel_size, config.context_parallel_size
    kv_heads = config.num_query_groups // tp
    s2_layout = s2.to_layout(config.num_attention_heads, config.num_query_groups)
    element = 2 if config.bf16 or config.fp16 else config.params_dtype.itemsize
    kw = dict(batch=micro_batch_size, kv_heads=kv_heads, head_dim=config.kv_channels, element_bytes=element)
    sparse = exchange_bytes(s2_layout, CPGeometry(cp, cp_rank, seq_len, s2.block_size), head_offset=head_offset, **kw)
    mib = lambda n: f"{n / 2**20:.2f} MiB"
    return (f"context parallel K/V exchange per layer per forward (rank {cp_rank}): S layers "
            f"{s2.cp_exchange} {mib(sparse[s2.cp_exchange])} (sparse {mib(sparse['sparse'])}, all-gather "
            f"{mib(sparse['all_gather'])}); D layers all-gather {mib(sparse['all_gather'])}; "
            f"{layout.count('S')} S + {layout.count('D')} D layers")


# -- the exchanges --------------------------------------------------------------------------------
def _place_local(local_bshd: torch.Tensor, geo: CPGeometry, rank: int, full_bshd: torch.Tensor) -> None:
    """Write rank's local tokens into their absolute place in ``full_bshd`` (inverse of the split)."""
    full_bshd[:, context_parallel_positions(geo.seq_len, geo.cp_size, rank, full_bshd.device)] = local_bshd


def _take_local(full_bshd: torch.Tensor, geo: CPGeometry, rank: int) -> torch.Tensor:
    return full_bshd.index_select(1, context_parallel_positions(geo.seq_len, geo.cp_size, rank, full_bshd.device))


class _AllGatherKV(torch.autograd.Function):
    """[b, s_local, G, d] per rank -> [b, seq, G, d] on every rank; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, kv_local, geo: CPGeometry, group):
        ctx.geo, ctx.group = geo, group
        # Collectives concatenate along dim 0: [cp * b, ...], viewed as [cp, b, ...].
        gathered = kv_local.new_empty((geo.cp_size * kv_local.shape[0],) + kv_local.shape[1:])
        _all_gather_single(gathered, kv_local.contiguous(), group=group)
        gathered = gathered.view((geo.cp_size,) + kv_local.shape)
        full = kv_local.new_empty(kv_local.shape[0], geo.seq_len, *kv_local.shape[2:])
        for rank in range(geo.cp_size):
            _place_local(gathered[rank], geo, rank, full)
        return full

    @staticmethod
    def backward(ctx, grad_full):
        geo = ctx.geo
        per_rank = torch.cat([_take_local(grad_full, geo, rank) for rank in range(geo.cp_size)])
        grad_local = per_rank.new_empty((per_rank.shape[0] // geo.cp_size,) + per_rank.shape[1:])
        _reduce_scatter_single(grad_local, per_rank, group=ctx.group)
        return grad_local, None, None


class _SparseExchangeKV(torch.autograd.Function):
    """[b, s_local, G, d] per rank -> [b, seq, G, d] holding only the key blocks this rank's
    queries attend (others zero); backward returns each block's gradient to its owner."""

    @staticmethod
    def forward(ctx, kv_local, layout, geo: CPGeometry, head_offset: int, group):
        b, _, kv_heads, d = kv_local.shape
        plan = _sparse_plan(layout, geo, head_offset, kv_heads)
        ctx.plan, ctx.geo, ctx.group = plan, geo, group
        me, bs, others = geo.cp_rank, geo.block_size, _others(geo)
        blocks_local = kv_local.view(b, -1, bs, kv_heads, d)
        # Indexing dims 1 and 3 puts the pairs first: [pairs, b, bs, d].
        send = torch.cat([blocks_local[:, plan[me, r][0], :, plan[me, r][1]] for r in others])
        recv = _all_to_all(send, [len(plan[me, r][0]) for r in others], [len(plan[p, me][0]) for p in others], group)
        full = kv_local.new_zeros(b, geo.seq_len // bs, bs, kv_heads, d)
        blocks, heads = (torch.cat([plan[p, me][i] for p in others]) for i in (2, 1))
        full[:, blocks, :, heads] = recv
        full = full.view(b, geo.seq_len, kv_heads, d)
        _place_local(kv_local, geo, me, full)
        return full

    @staticmethod
    def backward(ctx, grad_full):
        plan, geo = ctx.plan, ctx.geo
        me, bs, others = geo.cp_rank, geo.block_size, _others(geo)
        b, _, kv_heads, d = grad_full.shape
        blocks, heads = (torch.cat([plan[p, me][i] for p in others]) for i in (2, 1))
        grad_recv = grad_full.reshape(b, -1, bs, kv_heads, d)[:, blocks, :, heads]
        grad_sent = _all_to_all(grad_recv, [len(plan[p, me][0]) for p in others],
                                [len(plan[me, r][0]) for r in others], ctx.group)
        grad_local = _take_local(grad_full, geo, me)
        local, heads_sent = (torch.cat([plan[me, r][i] for r in others]) for i in (0, 1))
        # A block may go to several receivers: accumulate their gradients.
        grad_local.view(b, -1, bs, kv_heads, d).permute(1, 3, 0, 2, 4).index_put_(
            (local, heads_sent), grad_sent, accumulate=True)
        return grad_local, None, None, None, None


def _others(geo: CPGeometry) -> list[int]:
    return [r for r in range(geo.cp_size) if r != geo.cp_rank]


def _all_to_all(send, send_counts, recv_counts, group):
    """Exchange [n, ...] rows with the other ranks in rank order (self excluded from the counts)."""
    me = dist.get_rank(group)
    send_splits, recv_splits = list(send_counts), list(recv_counts)
    send_splits.insert(me, 0)
    recv_splits.insert(me, 0)
    recv = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=group)
    return recv


def exchange_kv(kv_local: torch.Tensor, geo: CPGeometry, group, *, layout: S2Layout | None = None,
                head_offset: int = 0, exchange: str = "sparse") -> torch.Tensor:
    """The keys (or values) of the whole sequence that this rank's queries need, [b, seq, G, d]."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if exchange == "sparse" and layout is not None:
        return _SparseExchangeKV.apply(kv_local, layout, geo, head_offset, group)
    return _AllGatherKV.apply(kv_local, geo, group)


def cp_attention(attend, q_local, k_local, v_local, geo: CPGeometry, group, *, layout: S2Layout | None = None,
                 head_offset: int = 0, exchange: str = "sparse") -> torch.Tensor:
    """Attention of this rank's queries [b, s_local, h, d] over the whole causal context.

    ``attend(q, k, v, q_offset)`` computes causal attention of q (at absolute ``q_offset``) over
    keys starting at position 0; ``layout`` (None for dense layers) enables the sparse exchange."""
    k_full, v_full = (exchange_kv(t, geo, group, layout=layout, head_offset=head_offset, exchange=exchange)
                      for t in (k_local, v_local))
    c = geo.chunk_len
    outs = []
    for pos, chunk in enumerate(geo.chunk_ids()):
        end = (chunk + 1) * c
        outs.append(attend(q_local[:, pos * c:(pos + 1) * c], k_full[:, :end], v_full[:, :end], chunk * c))
    return torch.cat(outs, dim=1)
