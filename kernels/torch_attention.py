"""The pure-PyTorch S2 attention path (CPU, and any device without Triton).

What it computes: exactly the S2 pattern of ``layout.py`` (with token causality and bounds), as
dense matmuls over the pattern's structure, never O(s^2) memory:

* the local window is a band: query block i sees key blocks i-W+1 .. i. Each query block's window
  is one contiguous slab of K, so the windows of a chunk of query blocks are one ``as_strided``
  view of K (no copy) and one batched matmul computes them;
* the strided blocks of a head are a fixed column subset (the blocks with the head's residue
  mod ``vert_stride``; every block for a dense head), gathered once per call. Query block i
  attends those with j <= i - L (older than its window), so a chunk of query blocks multiplies
  only the prefix of the subset it can see (causal skipping);
* band and strided scores share one softmax per row (a common max and sum): nothing to merge.

The query heads of one kv head that share a pattern form a unit (``_Unit``): the whole group under
"kv" sharding, one head under "query" sharding. A unit folds its heads into the rows of each query
block ([nq, heads*block, d]) against its kv head's K/V, which are never expanded; the band is the
same for every unit. Each (batch, unit) is its own problem, worked in chunks of query blocks that
bound the score buffers; dK/dV of a kv head sum over its units. The backward recomputes the scores
of a chunk (FlashAttention style: only q, K/V, out and lse are saved). Masks touch only the tiles
that need them (the diagonal block, the window edges, the strided columns that the chunk's first
query block cannot yet see). Arithmetic, out before the cast and lse in float32 (float64 for
float64 inputs).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .layout import S2Layout

_CHUNK_ELEMENTS = 1 << 21     # score elements per chunk: 8 MiB in fp32, reused by the allocator


@dataclass(frozen=True)
class _Unit:
    """Query heads of one kv head that share their pattern, worked together as the rows of each
    query block: a kv head's whole group under "kv" sharding, one head (or the heads that happen to
    share a residue) under "query" sharding, all of a dense kv head's heads."""

    kv_head: int
    """Local kv head."""
    heads: torch.Tensor
    """long [n]: local query heads."""
    col_abs: torch.Tensor
    """long [c]: absolute strided key blocks (every key block for dense heads)."""
    col_blocks: torch.Tensor
    """long [c]: the same blocks as indices into the padded keys."""


class _Plan:
    """Geometry of one call (cached): block counts, band placement, the units and their columns."""

    def __init__(self, layout: S2Layout, s_q: int, s_kv: int, q_offset: int, kv_offset: int,
                 head_offset: int, heads: int, device: torch.device):
        bs, L = layout.block_size, layout.local_blocks
        self.block, self.local_blocks = bs, L
        self.nq, nk = -(-s_q // bs), -(-s_kv // bs)
        qb0, kb0 = q_offset // bs, kv_offset // bs
        # Window slots that can hold a key (fewer than L when the keys start late).
        self.window = max(1, min(L, qb0 + self.nq - kb0))
        first = qb0 - kb0 - self.window + 1           # key block of query block 0's first slot
        self.pad_front = max(0, -first)               # zero blocks so every window is in range
        self.num_blocks_padded = self.pad_front + max(nk, first + self.nq + self.window - 1)
        self.first_window_block = first + self.pad_front
        self.q_block_abs = torch.arange(qb0, qb0 + self.nq, device=device)
        k_tok = torch.arange(self.num_blocks_padded * bs, device=device) - self.pad_front * bs
        self.key_valid = ((k_tok >= 0) & (k_tok < s_kv)).view(-1, bs)    # [padded blocks, bs]
        t, u = torch.arange(bs, device=device), torch.arange(bs, device=device)
        self.diagonal_causal = u.view(1, -1) <= t.view(-1, 1)             # [bs, bs]
        self.units = []
        group = layout.group_size
        for h0 in range(0, heads, group):              # the query heads of each local kv head
            by_pattern = {}                            # residue (None: dense) -> local query heads
            for h in range(h0, h0 + group):
                dense = layout.is_dense_head(head_offset + h)
                by_pattern.setdefault(None if dense else layout.strided_residue(head_offset + h), []).append(h)
            for residue, members in by_pattern.items():
                j_abs = torch.arange(kb0, kb0 + nk)
                if residue is not None:
                    j_abs = j_abs[j_abs % layout.vert_stride == residue]
                blocks = j_abs - kb0 + self.pad_front
                if len(j_abs) == 0:             # one never-visible column keeps the shapes simple
                    j_abs, blocks = torch.tensor([1 << 62]), torch.tensor([0])
                self.units.append(_Unit(h0 // group, torch.tensor(members, device=device),
                                        j_abs.to(device), blocks.to(device)))

    def chunks(self, rows: int, n_cols: int):
        """Query-block ranges [m0, m1) whose score buffers stay near _CHUNK_ELEMENTS."""
        step = max(1, _CHUNK_ELEMENTS // (rows * (self.window + n_cols) * self.block))
        return [(m0, min(self.nq, m0 + step)) for m0 in range(0, self.nq, step)]

    def window_blocks(self, m0: int, m1: int) -> torch.Tensor:
        """long [C, W]: padded key block in every window slot of query blocks m0..m1."""
        start = self.first_window_block + torch.arange(m0, m1, device=self.key_valid.device)
        return start.view(-1, 1) + torch.arange(self.window, device=start.device)

    def visible_columns(self, unit: _Unit, m0: int, m1: int) -> tuple[int, int]:
        """(strided blocks seen by every query block of the chunk, by its last one): j <= i - L."""
        col = unit.col_abs
        first, last = self.q_block_abs[m0] - self.local_blocks, self.q_block_abs[m1 - 1] - self.local_blocks
        return int((col <= first).sum()), int((col <= last).sum())


@functools.lru_cache(maxsize=64)
def _plan(layout, s_q, s_kv, q_offset, kv_offset, head_offset, heads, device) -> _Plan:
    return _Plan(layout, s_q, s_kv, q_offset, kv_offset, head_offset, heads, device)


class _Head:
    """One (batch, unit) problem: block-row queries, padded keys/values, gathered columns."""

    def __init__(self, plan: _Plan, unit: _Unit, q_nrd, k_td, v_td):
        bs, d = plan.block, q_nrd.shape[-1]
        self.plan, self.unit, self.q, self.k, self.v = plan, unit, q_nrd, k_td, v_td
        self.rows = q_nrd.shape[1]
        self.cols = unit.col_blocks
        self.k_cols = k_td.view(-1, bs * d).index_select(0, self.cols).view(-1, d)   # [n*bs, d]
        self.v_cols = v_td.view(-1, bs * d).index_select(0, self.cols).view(-1, d)

    def visible_columns(self, m0: int, m1: int) -> tuple[int, int]:
        return self.plan.visible_columns(self.unit, m0, m1)

    def windows(self, t_td, m0: int, m1: int):
        """[C, W*bs, d] view of the band windows of query blocks m0..m1 (no copy)."""
        plan, d = self.plan, t_td.shape[-1]
        return t_td.as_strided((m1 - m0, plan.window * plan.block, d), (plan.block * d, d, 1),
                               t_td.storage_offset() + (plan.first_window_block + m0) * plan.block * d)

    def scores(self, m0: int, m1: int, n_full: int, n_cols: int, scale: float, shift=None):
        """Masked scores (minus ``shift`` [C, rows, 1] if given): band [C, rows, W*bs],
        strided [C*rows, n_cols*bs]."""
        plan, bs, C = self.plan, self.plan.block, m1 - m0
        q_c = self.q[m0:m1]
        # beta=0 ignores the input: no pass over the buffer when there is nothing to subtract.
        base, beta = (shift, -1) if shift is not None else (q_c.new_zeros(()), 0)
        band = torch.baddbmm(base, q_c, self.windows(self.k, m0, m1).transpose(1, 2), beta=beta, alpha=scale)
        band_g = band.view(C, -1, bs, band.shape[-1])                     # [C, heads, bs, W*bs]
        band_g[..., -bs:].masked_fill_(~plan.diagonal_causal, float("-inf"))
        slots = plan.window_blocks(m0, m1)
        valid = plan.key_valid[slots].view(C, 1, 1, -1)
        if not bool(valid.all()):
            band_g.masked_fill_(~valid, float("-inf"))
        base = shift.reshape(-1, 1) if shift is not None else base
        strided = torch.addmm(base, q_c.reshape(-1, q_c.shape[-1]),
                              self.k_cols[:n_cols * bs].transpose(0, 1), beta=beta, alpha=scale)
        if n_full < n_cols:                    # columns some query blocks of the chunk cannot see
            tail = strided.view(C, -1, bs, n_cols, bs)[:, :, :, n_full:]
            col_abs = self.unit.col_abs[n_full:n_cols]
            older = col_abs.view(1, -1) <= (plan.q_block_abs[m0:m1] - plan.local_blocks).view(-1, 1)
            key_ok = plan.key_valid[self.cols[n_full:n_cols]]                  # [n, bs]
            tail.masked_fill_(~(older.unsqueeze(-1) & key_ok).view(C, 1, 1, -1, bs), float("-inf"))
        return band, strided


def _forward_head(h: _Head, scale: float, out_nrd, lse_nr):
    plan, rows = h.plan, h.rows
    for m0, m1 in plan.chunks(rows, len(h.cols)):
        n_full, n_cols = h.visible_columns(m0, m1)
        band, strided = h.scores(m0, m1, n_full, max(1, n_cols), scale)
        strided = strided.view(m1 - m0, rows, -1)
        top = torch.maximum(band.amax(-1, keepdim=True), strided.amax(-1, keepdim=True))
        top = torch.where(torch.isfinite(top), top, 0.0)
        p_band, p_str = band.sub_(top).exp_(), strided.sub_(top).exp_()
        total = p_band.sum(-1) + p_str.sum(-1)
        o = torch.bmm(p_band, h.windows(h.v, m0, m1))
        o.view(-1, o.shape[-1]).addmm_(p_str.view(-1, p_str.shape[-1]), h.v_cols[:p_str.shape[-1]])
        seen = total > 0
        out_nrd[m0:m1] = o.div_(torch.where(seen, total, 1.0).unsqueeze(-1))
        lse_nr[m0:m1] = torch.where(seen, torch.log(total) + top.squeeze(-1), float("-inf"))


def _backward_head(h: _Head, scale: float, out_nrd, lse_nr, dlse_nr, do_nrd, dq_nrd, dk_td, dv_td):
    plan, rows, bs, d = h.plan, h.rows, h.plan.block, h.q.shape[-1]
    delta_nr = (do_nrd * out_nrd).sum(-1) - dlse_nr          # lse's gradient enters here
    dk_cols, dv_cols = torch.zeros_like(h.k_cols), torch.zeros_like(h.v_cols)
    lse_nr = torch.where(torch.isfinite(lse_nr), lse_nr, float("inf"))      # empty rows: P = 0
    for m0, m1 in plan.chunks(rows, len(h.cols)):
        n_full, n_cols = h.visible_columns(m0, m1)
        n = max(1, n_cols) * bs
        q_c, do_c = h.q[m0:m1], do_nrd[m0:m1]
        p_band, p_str = h.scores(m0, m1, n_full, max(1, n_cols), scale, shift=lse_nr[m0:m1].unsqueeze(-1))
        p_band, p_str = p_band.exp_(), p_str.exp_()
        k_win, v_win = h.windows(h.k, m0, m1), h.windows(h.v, m0, m1)
        # dS / scale = P * (dP - Delta); the scale is applied in the dq/dk matmuls.
        delta_c = delta_nr[m0:m1].unsqueeze(-1)
        ds_band = torch.baddbmm(delta_c, do_c, v_win.transpose(1, 2), beta=-1).mul_(p_band)
        q_f, do_f = q_c.reshape(-1, d), do_c.reshape(-1, d)
        ds_str = torch.addmm(delta_c.reshape(-1, 1), do_f, h.v_cols[:n].transpose(0, 1), beta=-1).mul_(p_str)
        dq_c = torch.bmm(ds_band, k_win).mul_(scale)
        dq_c.view(-1, d).addmm_(ds_str, h.k_cols[:n], alpha=scale)
        dq_nrd[m0:m1] = dq_c
        dv_cols[:n].addmm_(p_str.transpose(0, 1), do_f)
        dk_cols[:n].addmm_(ds_str.transpose(0, 1), q_f, alpha=scale)
        # Fold the overlapping band windows back onto their key blocks.
        slots = plan.window_blocks(m0, m1).flatten()
        dv_td.view(-1, bs * d).index_add_(0, slots, torch.bmm(p_band.transpose(1, 2), do_c).view(-1, bs * d))
        dk_td.view(-1, bs * d).index_add_(0, slots, torch.bmm(ds_band.transpose(1, 2), q_c).view(-1, bs * d),
                                          alpha=scale)
    dk_td.view(-1, bs * d).index_add_(0, h.cols, dk_cols.view(-1, bs * d))
    dv_td.view(-1, bs * d).index_add_(0, h.cols, dv_cols.view(-1, bs * d))


def _block_rows(x_bshd, heads: torch.Tensor, plan: _Plan, dtype):
    """[b, s, H, d] -> [b, nq, n*bs, d]: the rows of the n selected heads in each query block,
    head-major within a block (zero-padded to whole blocks)."""
    b, s, _, d = x_bshd.shape
    nq, bs = plan.nq, plan.block
    out = x_bshd.new_zeros(b, nq, len(heads), bs, d, dtype=dtype)
    by_token = out.permute(0, 1, 3, 2, 4)                                 # [b, nq, bs, n, d] view
    picked = x_bshd.index_select(2, heads)
    whole = s // bs
    by_token[:, :whole] = picked[:, :whole * bs].view(b, whole, bs, len(heads), d)
    if whole < nq:                                        # the partial last block
        by_token[:, whole, :s - whole * bs] = picked[:, whole * bs:]
    return out.view(b, nq, -1, d)


def _from_block_rows(x_bnrd, s: int, n: int):
    """Inverse of _block_rows: [b, nq, n*bs, d] -> [b, s, n, d]."""
    b, nq, rows, d = x_bnrd.shape
    return x_bnrd.view(b, nq, n, rows // n, d).permute(0, 1, 3, 2, 4).reshape(b, -1, n, d)[:, :s]


def _padded_keys(t_bshd, plan: _Plan, dtype):
    """[b, s, kv_heads, d] -> [b, kv_heads, padded blocks * bs, d] with zero padding."""
    b, s, kv_heads, d = t_bshd.shape
    out = t_bshd.new_zeros(b, kv_heads, plan.num_blocks_padded * plan.block, d, dtype=dtype)
    start = plan.pad_front * plan.block
    out[:, :, start:start + s] = t_bshd.transpose(1, 2)
    return out


class _S2TorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, head_offset, q_offset, kv_offset):
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, s_q, heads, d = q.shape
        plan = _plan(layout, s_q, k.shape[1], q_offset, kv_offset, head_offset, heads, q.device)
        k_pad, v_pad = _padded_keys(k, plan, dtype), _padded_keys(v, plan, dtype)
        out = q.new_empty(b, s_q, heads, d, dtype=dtype)
        lse = q.new_empty(b, s_q, heads, dtype=dtype)
        for unit in plan.units:
            n = len(unit.heads)
            q_rows = _block_rows(q, unit.heads, plan, dtype)
            out_rows, lse_rows = torch.empty_like(q_rows), q_rows.new_empty(q_rows.shape[:-1])
            for bi in range(b):
                h = _Head(plan, unit, q_rows[bi], k_pad[bi, unit.kv_head], v_pad[bi, unit.kv_head])
                _forward_head(h, scale, out_rows[bi], lse_rows[bi])
            out[:, :, unit.heads] = _from_block_rows(out_rows, s_q, n)
            lse[:, :, unit.heads] = _from_block_rows(lse_rows.unsqueeze(-1), s_q, n).squeeze(-1)
        ctx.save_for_backward(q, k_pad, v_pad, out, lse)
        ctx.plan, ctx.scale, ctx.k_shape, ctx.k_dtype = plan, scale, k.shape, k.dtype
        return out.to(q.dtype), lse.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k_pad, v_pad, out, lse = ctx.saved_tensors
        plan, scale, k_shape = ctx.plan, ctx.scale, ctx.k_shape
        dtype, s_q = out.dtype, q.shape[1]
        d_lse = d_lse.transpose(1, 2).unsqueeze(-1)                      # [b, s_q, heads, 1]
        dq = torch.empty_like(out)
        dk, dv = torch.zeros_like(k_pad), torch.zeros_like(v_pad)
        for unit in plan.units:
            rows = lambda x: _block_rows(x, unit.heads, plan, dtype)
            q_rows, out_rows, do_rows = rows(q), rows(out), rows(d_out)
            lse_rows, dlse_rows = rows(lse.unsqueeze(-1)).squeeze(-1), rows(d_lse).squeeze(-1)
            dq_rows = torch.empty_like(q_rows)
            for bi in range(q.shape[0]):
                g = unit.kv_head
                h = _Head(plan, unit, q_rows[bi], k_pad[bi, g], v_pad[bi, g])
                _backward_head(h, scale, out_rows[bi], lse_rows[bi], dlse_rows[bi], do_rows[bi],
                               dq_rows[bi], dk[bi, g], dv[bi, g])
            dq[:, :, unit.heads] = _from_block_rows(dq_rows, s_q, len(unit.heads))
        keys = slice(plan.pad_front * plan.block, plan.pad_front * plan.block + k_shape[1])
        dk, dv = (t[:, :, keys].transpose(1, 2).to(ctx.k_dtype) for t in (dk, dv))
        return dq.to(q.dtype), dk, dv, None, None, None, None, None


def torch_attention(q, k, v, layout: S2Layout, softmax_scale: float, head_offset: int, q_offset: int,
                    kv_offset: int):
    """(out [b, s_q, h, d] like q, lse [b, h, s_q] float32, float64 for float64 q); see the module
    docstring. Needs s_q, s_kv and batch >= 1 (``s2_attention`` answers empty inputs itself)."""
    return _S2TorchFunction.apply(q, k, v, layout, softmax_scale, head_offset, q_offset, kv_offset)
