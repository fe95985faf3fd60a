"""The pure-PyTorch S2 attention path (CPU, and any device without Triton).

What it computes: exactly the S2 pattern of ``layout.py`` (with token causality and bounds), as
calls of a fused dense attention kernel over the pattern's structure, never O(s^2) memory:

* the local window is a band: query block i sees key blocks i-W+1 .. i, one contiguous slab of K.
  The windows of all query blocks are one ``as_strided`` view of K (no copy), so one call per
  sequence, with the query blocks as its batch and the kv heads as its heads, attends every
  window under one mask broadcast over the blocks (the diagonal block's causality). A kv head's
  group is folded into the rows of a query block (K/V are never expanded), and where a block has
  few rows, G blocks share an entry and the union of their windows (``_Plan._band_calls``). The
  first and last blocks, whose windows reach padding (before the first key or past the last),
  take one call each side, with a mask per block, on a zero-padded copy of the few key blocks they
  read;
* the strided blocks of a head are a fixed column subset (the blocks with the head's residue mod
  ``vert_stride``; every block for a dense head), gathered once per call. Query block i sees those
  with j <= i - L (older than its window), so the count it sees steps once per ``vert_stride``
  blocks (every block for a dense head). The heads that share a kv head and a pattern form a unit;
  units are stacked at offsets that line up their steps (``_Stack``), so that one unmasked call per
  run of equal counts attends every unit's rows against its own prefix of columns (causal
  skipping): about s / (bs * vert_stride) runs, and s / bs for dense heads. Short runs go in
  groups (``_grouped``): the group's rows against its first run's columns in one call (ATen's
  kernel takes larger query tiles from 768 rows), and each later run against its extra columns;
* the strided results merge into the band's through their log-sum-exps (``merge.merge_attention``'s
  rule).

The backward runs the kernel's backward on the same pieces, given the merged out and lse:
FlashAttention's P = exp(S - lse) and Delta = rowsum(dO * out) hold on every subset of the keys.
The band's dK/dV come per window and are folded back onto their key blocks. lse's gradient enters
as Delta - dlse, through one extra feature column (0 in q, k, v; -dlse in out; 1 in dO), only when
it is nonzero.

The kernel (``_attend``, ``_attend_backward``): on the CPU, ATen's fused flash-attention kernel, the
one behind ``F.scaled_dot_product_attention`` there, called through its lse-returning operators;
elsewhere, the same formulas in matmuls (one call's scores in memory). Arithmetic, out before the
cast and lse in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .layout import S2Layout
from .merge import safe_logsumexp

_NEG_INF = float("-inf")
_BAND_GRAD_ELEMENTS = 1 << 20   # band window gradients per backward call: 4 MiB in fp32, in cache
_STACK_ROWS = 1 << 15           # query rows stacked at once: 8 MiB per tensor at d = 64 in fp32
_MATMUL_SCORES = 1 << 26        # scores of one matmul piece (off the CPU): 256 MiB in fp32
_LONG_CALL_ROWS = 768           # query rows per head from which ATen's CPU kernel tiles by 256 rows


def _attend(q, k, v, mask, scale: float):
    """Softmax attention with its lse, on ATen's fused CPU kernel (``_matmul_attend`` elsewhere).

    q [B, H, Lq, d], k/v [B, H, Lk, d] (any strides with a contiguous last dim; an expanded k/v
    is read, not copied), mask None or additive (0 / -inf, q's dtype) broadcastable to
    [B, H, Lq, Lk]; scores are ``scale * q k^T + mask``. Returns out [B, H, Lq, d] and lse
    [B, H, Lq] (float32, float64 for float64 q); rows that the mask hides entirely get out 0 and
    lse -inf.
    """
    if q.device.type != "cpu":
        return _matmul_attend(q, k, v, mask, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    unseen = None if mask is None else torch.isneginf(mask).all(-1)
    if unseen is not None and bool(unseen.any()):     # the fused kernel reports lse 0 for such rows
        out.masked_fill_(unseen.unsqueeze(-1), 0.0)
        lse.masked_fill_(unseen, _NEG_INF)
    return out, lse


def _attend_backward(do, q, k, v, out, lse, mask, scale: float):
    """(dq, dk, dv) of an ``_attend`` call that is one part of a larger attention, given the whole
    attention's out [B, H, Lq, d] and lse [B, H, Lq] (+inf on rows that see no key, so P = 0):
    P = exp(S - lse), dS = P * (dO v^T - rowsum(dO * out)) (FlashAttention-2, Dao 2023, alg. 2).
    Shapes as ``_attend``; dk/dv come back [B, H, Lk, d] even for an expanded k/v."""
    if q.device.type != "cpu":
        return _matmul_attend_backward(do, q, k, v, out, lse, mask, scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)


def _pieces(q, k):
    """Slices (of dim 0, of the query rows) that cut one call into pieces whose scores hold at
    most _MATMUL_SCORES elements."""
    B, H, Lq, _ = q.shape
    rows = max(1, _MATMUL_SCORES // (H * k.shape[2]))          # query rows per piece, over B x Lq
    step_b, step_q = (max(1, rows // Lq), Lq) if rows >= Lq else (1, rows)
    for b0, q0 in itertools.product(range(0, B, step_b), range(0, Lq, step_q)):
        yield slice(b0, b0 + step_b), slice(q0, q0 + step_q)


def _piece_scores(q, k, mask, scale, bs: slice, qs: slice):
    s = torch.matmul(q[bs, :, qs], k[bs].transpose(-2, -1)) * scale
    if mask is not None:
        s = s + mask[bs if mask.shape[0] > 1 else slice(None), :, qs if mask.shape[2] > 1 else slice(None)]
    return s


def _matmul_attend(q, k, v, mask, scale: float):
    """``_attend`` in matmuls, piece by piece (any device)."""
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1])
    for bs, qs in _pieces(q, k):
        s = _piece_scores(q, k, mask, scale, bs, qs)
        lse[bs, :, qs] = safe_logsumexp(s, -1)
        top = torch.where(torch.isfinite(lse[bs, :, qs]), lse[bs, :, qs], 0.0).unsqueeze(-1)
        out[bs, :, qs] = torch.matmul(torch.exp(s - top), v[bs])
    return out, lse


def _matmul_attend_backward(do, q, k, v, out, lse, mask, scale: float):
    """``_attend_backward`` in matmuls, piece by piece (any device)."""
    dq = torch.empty_like(q)
    dk, dv = q.new_zeros(k.shape), q.new_zeros(v.shape)
    for bs, qs in _pieces(q, k):
        p = torch.exp(_piece_scores(q, k, mask, scale, bs, qs) - lse[bs, :, qs].unsqueeze(-1))
        do_p = do[bs, :, qs]
        ds = p * (torch.matmul(do_p, v[bs].transpose(-2, -1)) - (do_p * out[bs, :, qs]).sum(-1, keepdim=True))
        dq[bs, :, qs] = torch.matmul(ds, k[bs]) * scale
        dk[bs] += torch.matmul(ds.transpose(-2, -1), q[bs, :, qs]) * scale
        dv[bs] += torch.matmul(p.transpose(-2, -1), do_p)
    return dq, dk, dv


def _additive(allowed: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """bool mask -> additive 0 / -inf mask (what the fused kernel adds to the scores)."""
    return None if allowed is None else torch.zeros(allowed.shape, dtype=dtype, device=allowed.device) \
        .masked_fill_(~allowed, _NEG_INF)


@dataclass(frozen=True)
class _BandCall:
    """Query blocks [m0, m1) of the band, ``superblock`` (G) blocks to a call entry: an entry's
    rows are its G blocks' rows of one kv head's group, its keys the union of their windows,
    G + W - 1 key blocks."""

    m0: int
    m1: int
    superblock: int
    allowed: torch.Tensor
    """bool [entries or 1, 1, G*group*bs, (G+W-1)*bs]: the scores an entry keeps."""


@dataclass(frozen=True)
class _Run:
    """One strided call: the rows of stack blocks [k0, k1) against columns [c0, cols) of every
    unit's own, which every unit sees there (but those ``keys_ok`` hides)."""

    k0: int
    k1: int
    c0: int
    """The first column of the call: 0, or, for a later run of a group (``_grouped``), the first
    run's column count (the group's call covers the columns before it)."""
    cols: int
    """The columns of the call end here: the most any unit sees."""
    keys_ok: torch.Tensor | None
    """bool [1, units, 1, (cols - c0)*bs]: the keys each unit sees (fewer columns than ``cols``,
    keys past the end), or None when every unit sees them all (no mask)."""


@dataclass(frozen=True)
class _Span:
    """Stack blocks [k0, k1) whose rows are stacked at once (bounded memory): ``runs`` inside."""

    k0: int
    k1: int
    runs: tuple


@dataclass(frozen=True)
class _Stack:
    """Units attended together: a unit is the query heads of one kv head that share a pattern (a
    kv head's group under "kv" sharding, the heads with one residue under "query" sharding, a dense
    kv head's heads); a stack holds the units with one head count and one period (``vert_stride``,
    1 for dense heads). A unit's strided column count steps once per period; placing its query
    block 0 ``offsets[u]`` blocks into the stack makes its count step at the same stack blocks, to
    the same values, as every other unit's, so each run of stack blocks is one unmasked kernel call
    for all units (the units as the call's heads)."""

    kv_heads: tuple
    """Local kv head of each unit."""
    heads: tuple
    """Each unit's query heads within its kv head's group (a slice: evenly spaced, n of them)."""
    offsets: tuple
    """Stack block of each unit's query block 0."""
    col_blocks: torch.Tensor
    """long [units, c]: each unit's strided key blocks (every key block for dense heads) as
    indices into the key blocks, in order; padded past a unit's ``col_counts`` (never seen)."""
    col_counts: tuple
    """Strided key blocks of each unit."""
    spans: tuple
    """The ``_Span`` s holding the ``_Run`` s, the stack blocks where some unit sees a column."""


class _Plan:
    """Geometry of one call (cached): block counts, band placement and its calls, the units."""

    def __init__(self, layout: S2Layout, s_q: int, s_kv: int, q_offset: int, kv_offset: int,
                 head_offset: int, heads: int, device: torch.device):
        bs, L = layout.block_size, layout.local_blocks
        self.block, self.group = bs, layout.group_size
        self.nq, nk = -(-s_q // bs), -(-s_kv // bs)
        qb0, kb0 = q_offset // bs, kv_offset // bs
        # Window slots that can hold a key (fewer than L when the keys start late).
        self.window = max(1, min(L, qb0 + self.nq - kb0))
        self.key_blocks = nk
        self.first_key_block = qb0 - kb0 - self.window + 1      # key block of query block 0's first slot
        # Blocks before the first key and past the last, so that every window's slots index blocks.
        pad_front = max(0, -self.first_key_block)
        k_tok = torch.arange((pad_front + max(nk, self.first_key_block + self.nq + self.window - 1)) * bs) - pad_front * bs
        key_valid = ((k_tok >= 0) & (k_tok < s_kv)).view(-1, bs)          # [padded blocks, bs]
        self.band_calls = self._band_calls(key_valid[pad_front + self.first_key_block:], device)
        q_block_abs = torch.arange(qb0, qb0 + self.nq)
        by_kind = {}                   # (dense, heads) -> [(kv head, heads, columns, columns seen)]
        for h0 in range(0, heads, layout.group_size):      # the query heads of each local kv head
            by_pattern = {}                                  # residue (None: dense) -> heads
            for h in range(h0, h0 + layout.group_size):
                dense = layout.is_dense_head(head_offset + h)
                by_pattern.setdefault(None if dense else layout.strided_residue(head_offset + h), []).append(h - h0)
            for residue, members in by_pattern.items():
                j_abs = torch.arange(kb0, kb0 + nk)
                if residue is not None:
                    j_abs = j_abs[j_abs % layout.vert_stride == residue]
                step = members[1] - members[0] if len(members) > 1 else 1
                assert members == list(range(members[0], members[-1] + 1, step)), members
                seen = torch.searchsorted(j_abs, q_block_abs - L, right=True)   # columns j <= i - L
                by_kind.setdefault((residue is None, len(members)), []).append(
                    (h0 // layout.group_size, slice(members[0], members[-1] + 1, step), j_abs - kb0, seen))
        self.stacks = [self._stack(units, 1 if dense else layout.vert_stride, key_valid[pad_front:pad_front + nk], device)
                       for (dense, _), units in by_kind.items()]

    def _stack(self, units, period: int, key_valid: torch.Tensor, device) -> _Stack:
        """Line up the units' column counts (see ``_Stack``) and cut the stack into runs."""
        # From its first step s (to count c), a unit's count steps once per period. Placed at
        # offsets with o + s - period * c the same multiple of period for every unit, the units step
        # at the same stack blocks to the same counts: a run's call needs no mask.
        phases = {}
        for u, (_, _, _, seen) in enumerate(units):
            steps = torch.nonzero(seen[1:] != seen[:-1]).flatten() + 1
            if len(steps):
                phases[u] = int(steps[0]) - period * int(seen[steps[0]])
        top = -(-max(phases.values(), default=0) // period) * period
        offsets = [top - phases[u] if u in phases else 0 for u in range(len(units))]
        blocks = -(-(self.nq + max(offsets)) // period) * period
        per_block = torch.full((blocks, len(units)), -1, dtype=torch.long)   # columns seen, -1 off the unit
        for u, (o, (_, _, _, seen)) in enumerate(zip(offsets, units)):
            per_block[o:o + self.nq, u] = seen
        per_period = per_block.view(-1, period, len(units)).amax(1)
        constant = (per_block < 0) | (per_block == per_period.repeat_interleave(period, 0))
        assert bool(constant.all()), "a unit's strided columns change inside a period"
        counts = [len(cols) for _, _, cols, _ in units]
        col_blocks = torch.zeros(len(units), max(1, max(counts)), dtype=torch.long)
        for u, (_, _, cols, _) in enumerate(units):
            col_blocks[u, :len(cols)] = cols
        runs, k0 = [], 0
        seen_runs, lengths = torch.unique_consecutive(per_period, dim=0, return_counts=True)
        for seen, n in zip(seen_runs, lengths.tolist()):
            k1, cols = k0 + n * period, int(seen.max())
            if cols > 0:                               # a unit off its rows may see any columns
                seen = torch.where(seen < 0, cols, seen)
                ok = (torch.arange(cols).view(1, -1) < seen.view(-1, 1)).unsqueeze(-1) & key_valid[col_blocks[:, :cols]]
                keys_ok = None if bool(ok.all()) else ok.view(1, len(units), 1, -1).to(device)
                runs.append(_Run(k0, k1, 0, cols, keys_ok))
            k0 = k1
        unit_rows = _count(units[0][1]) * self.block                         # a unit's rows per block
        runs = _grouped(runs, unit_rows)
        spans, rows = [], len(units) * unit_rows                             # stacked rows per block
        # Consecutive calls while their stacked rows stay in budget; a group's later calls may open a
        # span on blocks the last one held (their results merge).
        for run in runs:
            if spans and (run.k1 - spans[-1][0]) * rows <= _STACK_ROWS:
                spans[-1][1].append(run)
            else:
                spans.append((run.k0, [run]))
        spans = tuple(_Span(k0, max(run.k1 for run in span), tuple(span)) for k0, span in spans)
        return _Stack(tuple(u[0] for u in units), tuple(u[1] for u in units), tuple(offsets),
                      col_blocks.to(device), tuple(counts), spans)

    def _band_allowed(self, superblock: int) -> torch.Tensor:
        """bool [1, 1, G*group*bs, (G+W-1)*bs] for G = superblock: row (block a, head, token t)
        keeps key (slot j, token u) when slot j is in block a's window (a <= j < a + W) and, in its
        diagonal block (j = a + W - 1), u <= t."""
        G, W, bs = superblock, self.window, self.block
        a = torch.arange(G).view(G, 1, 1, 1, 1)
        t = torch.arange(bs).view(1, 1, bs, 1, 1)
        slot = torch.arange(G + W - 1).view(1, 1, 1, -1, 1) - a
        u = torch.arange(bs).view(1, 1, 1, 1, bs)
        keep = (slot >= 0) & (slot < W) & ((slot < W - 1) | (u <= t))      # [G, 1, bs, G+W-1, bs]
        return keep.expand(G, self.group, bs, G + W - 1, bs).reshape(1, 1, G * self.group * bs, -1)

    def _band_calls(self, key_valid: torch.Tensor, device) -> list:
        """The band's calls. The inner query blocks, whose windows hold only keys, share one mask
        broadcast over their entries; the blocks whose windows reach padding (a prefix and a
        suffix) take masks of their own. ``key_valid``: bool [blocks from query block 0's first slot,
        bs], the slots that hold a key.

        Superblocks: ATen's CPU kernel tiles an entry's queries by 32 rows below 192 rows and by 64
        from there. With 64 rows per block (MHA, bs = 64, W = 8), 3 blocks to an entry computed
        25% more score pairs yet ran the band 10-20% faster on two cores, and its backward folds
        back 10 window blocks per 3 query blocks instead of 8 per block. G is the smallest count
        that reaches 192 rows, kept when it adds at most 25% pairs."""
        bs, W, nq = self.block, self.window, self.nq
        slots = torch.arange(nq).view(-1, 1) + torch.arange(W)
        keys_ok = key_valid[slots].view(nq, 1, 1, W * bs)
        inner = keys_ok.view(nq, -1).all(-1).tolist()
        lo = next((m for m in range(nq) if inner[m]), nq)
        hi = max(lo, next((m + 1 for m in reversed(range(nq)) if inner[m]), 0))
        assert all(inner[lo:hi]), "keys are one range of tokens, so are the blocks that see only keys"
        G = -(-192 // (self.group * bs))
        G = G if (G + W - 1) <= 1.25 * W else 1
        mid = lo + (hi - lo) // G * G
        one = self._band_allowed(1)
        calls = [(0, lo, 1, one & keys_ok[:lo]), (lo, mid, G, self._band_allowed(G)), (mid, hi, 1, one),
                 (hi, nq, 1, one & keys_ok[hi:])]
        return [_BandCall(m0, m1, g, allowed.to(device)) for m0, m1, g, allowed in calls if m1 > m0]


@functools.lru_cache(maxsize=64)
def _plan(layout, s_q, s_kv, q_offset, kv_offset, head_offset, heads, device) -> _Plan:
    return _Plan(layout, s_q, s_kv, q_offset, kv_offset, head_offset, heads, device)


def _block_rows(x_bshd, plan: _Plan, dtype):
    """[b, s, H, ...] -> [b, kv_heads, nq, group*bs, ...]: each kv head's query rows by block, the
    group's heads one after another within a block (zero-padded to whole blocks). Stored token
    major ([b, nq, group*bs, kv_heads, ...] in memory, the order of the fused kernel's lse and
    gradients), so that with one head per kv head it is a view of a contiguous x of whole blocks."""
    b, s, H = x_bshd.shape[:3]
    nq, bs, group, rest = plan.nq, plan.block, plan.group, x_bshd.shape[3:]
    if group == 1 and s == nq * bs and x_bshd.dtype == dtype and x_bshd.is_contiguous():
        out = x_bshd.view(b, nq, 1, bs, H, *rest)
    else:
        out = x_bshd.new_empty(b, nq, group, bs, H // group, *rest, dtype=dtype)
        by_token = out.movedim(2, 4)                             # [b, nq, bs, kv_heads, group, ...]
        x = x_bshd.unflatten(2, (H // group, group))
        whole = s // bs
        by_token[:, :whole] = x[:, :whole * bs].unflatten(1, (whole, bs))
        if whole < nq:                                        # the partial last block
            by_token[:, whole, :s - whole * bs] = x[:, whole * bs:]
            by_token[:, whole, s - whole * bs:] = 0
    return out.movedim(4, 1).flatten(3, 4)


def _new_rows(q):
    """An empty [b, kv_heads, nq, rows] like q's rows without their features, stored like
    ``_block_rows`` (token major)."""
    b, kv_heads, nq, rows = q.shape[:4]
    return q.new_empty(b, nq, rows, kv_heads).movedim(3, 1)


def _from_block_rows(x, s: int, plan: _Plan, copy: bool = True):
    """Inverse of _block_rows: [b, kv_heads, nq, group*bs, ...] -> [b, s, H, ...]. With ``copy``, a
    new tensor (an output of the autograd function that is also saved must be the caller's to
    change in place); without, a view of x where its storage allows."""
    b, kv_heads, nq, bs = x.shape[0], x.shape[1], plan.nq, plan.block
    if plan.group == 1 and s == nq * bs:
        out = x.movedim(1, 3).reshape(b, s, kv_heads, *x.shape[4:])
        return out.clone() if copy else out
    out = x.new_empty(b, s, kv_heads * plan.group, *x.shape[4:])
    by_token = x.unflatten(3, (plan.group, bs)).movedim((1, 3), (3, 4))   # [b, nq, bs, kv, group, ...]
    dst = out.unflatten(2, (kv_heads, plan.group))
    whole = s // bs
    dst[:, :whole * bs].unflatten(1, (whole, bs)).copy_(by_token[:, :whole])
    if whole < nq:                                        # the partial last block
        dst[:, whole * bs:].copy_(by_token[:, whole, :s - whole * bs])
    return out


def _keys(t_bshd, plan: _Plan, dtype):
    """[b, s_kv, kv_heads, d] -> [b, kv_heads, whole blocks * bs, d], stored token major ([b, tokens,
    kv_heads, d] in memory, like the fused kernel's dK/dV): a view of t when it holds whole blocks
    of ``dtype`` with a contiguous last dim, else a copy zero-padded at the end."""
    b, s, kv_heads, d = t_bshd.shape
    tokens = plan.key_blocks * plan.block
    if s == tokens and t_bshd.dtype == dtype and t_bshd.stride(-1) == 1:
        return t_bshd.transpose(1, 2)
    out = t_bshd.new_empty(b, tokens, kv_heads, d, dtype=dtype)
    out[:, :s] = t_bshd
    out[:, s:] = 0
    return out.transpose(1, 2)


def _new_keys(like, tokens: int):
    """Zeros [b, kv_heads, tokens, d] like the keys, stored token major."""
    b, kv_heads, _, d = like.shape
    return like.new_zeros(b, tokens, kv_heads, d).transpose(1, 2)


def _band_rows(x, call: _BandCall, m0: int, m1: int):
    """[kv_heads, nq, group*bs, ...] rows of one sequence -> [entries, kv_heads, G*group*bs, ...]
    view: query blocks m0..m1 as the call's entries."""
    return x[:, m0:m1].unflatten(1, (-1, call.superblock)).flatten(2, 3).transpose(0, 1)


def _window_keys(t_td, plan: _Plan, m0: int, m1: int):
    """The key blocks that the band windows of query blocks m0..m1 read, from t_td [kv_heads, T, d]
    (one sequence's whole key blocks): (keys, the block of m0's window in them, None) where every
    window lies in t_td (keys = t_td); else (a zero-padded token-major copy of the blocks the
    windows cover, 0, (tokens in t_td, the same tokens in the copy)), for the query blocks whose
    windows reach before the first key or past the last."""
    lo, hi = plan.first_key_block + m0, plan.first_key_block + m1 + plan.window - 1
    if lo >= 0 and hi <= plan.key_blocks:
        return t_td, lo, None
    bs, (a, z) = plan.block, (max(lo, 0), min(hi, plan.key_blocks))
    keys = _new_keys(t_td.unsqueeze(0), (hi - lo) * bs)[0]
    overlap = (slice(a * bs, z * bs), slice((a - lo) * bs, (z - lo) * bs)) if z > a else (slice(0), slice(0))
    keys[:, overlap[1]] = t_td[:, overlap[0]]
    return keys, 0, overlap


def _windows(keys, start: int, plan: _Plan, call: _BandCall, entries: int):
    """[kv_heads, T, d] keys -> [entries, kv_heads, (G+W-1)*bs, d]: the key windows of ``entries``
    band entries, the first starting at block ``start``, each G blocks after the last; a view."""
    kv_heads, _, d = keys.shape
    bs, G, (head_stride, token_stride, _) = plan.block, call.superblock, keys.stride()
    return keys.as_strided((entries, kv_heads, (G + plan.window - 1) * bs, d),
                           (G * bs * token_stride, head_stride, token_stride, 1),
                           keys.storage_offset() + start * bs * token_stride)


def _fold_(grad, window_grad, start: int, superblock: int, bs: int):
    """Add window gradients [entries, kv_heads, (G+W-1)*bs, d] onto grad [kv_heads, T, d] (token
    major, whole blocks), where entry e's window starts at block start + e*G: the overlapping
    windows summed back onto their key blocks. Window block m*G + p of every entry lands on block
    start + (e+m)*G + p, so each m is one add over a contiguous range of blocks (ceil((G+W-1)/G)
    adds). Returns grad."""
    entries, kv_heads, length, d = window_grad.shape
    G, blocks = superblock, length // bs
    dst = grad.transpose(0, 1).view(-1, bs * kv_heads * d)           # token major: raises otherwise
    src = window_grad.transpose(1, 2).reshape(entries, blocks, -1)
    for m in range(0, blocks, G):
        n = min(G, blocks - m)
        dst[start + m:].as_strided((entries, n, dst.shape[1]), (G * dst.stride(0), dst.stride(0), 1)) \
            .add_(src[:, m:m + n])
    return grad


def _grouped(runs: list, block_rows: int) -> list:
    """Consecutive unmasked runs -> fewer, longer calls: a group's rows against the columns its first
    run sees (one unmasked call with the rows of all), then each later run's rows against the
    columns it sees beyond those (calls of a few columns). ATen's CPU kernel tiles a call's queries
    by 32 or 64 rows below 768 rows (per head) and by 256 from there: at 16k (d = 64, runs of 512
    rows in pairs) the strided backward ran about 10% faster, the forward the same. A group takes
    runs until it holds _LONG_CALL_ROWS rows, at most 4 (``block_rows``: a unit's rows per stack
    block)."""
    calls, group = [], []
    for run in runs + [None]:
        if group and (run is None or run.keys_ok is not None or run.k0 != group[-1].k1
                      or (group[-1].k1 - group[0].k0) * block_rows >= _LONG_CALL_ROWS or len(group) == 4):
            first = group[0]
            assert all(r.cols >= first.cols for r in group), "column counts only grow along a stack"
            calls.append(_Run(first.k0, group[-1].k1, 0, first.cols, None))
            calls += [_Run(r.k0, r.k1, first.cols, r.cols, None) for r in group[1:] if r.cols > first.cols]
            group = []
        if run is not None and run.keys_ok is None:
            group.append(run)
        elif run is not None:
            calls.append(run)
    return calls


def _count(heads: slice) -> int:
    return len(range(heads.stop)[heads])


def _span_blocks(stack: _Stack, span: _Span, nq: int):
    """(unit, its query blocks [lo, hi) in the span, their first stack block - span.k0)."""
    for u, o in enumerate(stack.offsets):
        lo, hi = max(span.k0 - o, 0), min(span.k1 - o, nq)
        if hi > lo:
            yield u, lo, hi, lo + o - span.k0


def _stack_buffer(x, stack: _Stack, plan: _Plan):
    """An empty [b, units, blocks, n*bs, ...] for the stacked rows of x (block rows [b, kv_heads, nq,
    group*bs, ...]) of the stack's largest span: one buffer serves every span (``_in_span``), not
    new tensors per span (at 16k the work outside the kernel calls went from 198 to 164 ms)."""
    blocks = max((span.k1 - span.k0 for span in stack.spans), default=0)
    return x.new_empty(x.shape[0], len(stack.heads), blocks, _count(stack.heads[0]) * plan.block, *x.shape[4:])


def _in_span(buffer, span: _Span):
    """The first span blocks of a ``_stack_buffer``: [b, units, span blocks, n*bs, ...]."""
    return buffer[:, :, :span.k1 - span.k0]


def _stacked(x, stack: _Stack, span: _Span, plan: _Plan, buffer):
    """[b, kv_heads, nq, group*bs, ...] block rows -> [b, units, span blocks, n*bs, ...] in a
    ``_stack_buffer``: each unit's rows at its offset, zeros elsewhere (their results are dropped)."""
    out = _in_span(buffer, span)
    covered = {u: (lo, hi, at) for u, lo, hi, at in _span_blocks(stack, span, plan.nq)}
    for u in range(len(stack.heads)):
        lo, hi, at = covered.get(u, (0, 0, 0))
        out[:, u, at:at + hi - lo] = _head_rows(x, stack, u, plan)[:, lo:hi].flatten(2, 3)
        out[:, u, :at] = 0
        out[:, u, at + hi - lo:] = 0
    return out


def _unstacked(x, x_stacked, stack: _Stack, span: _Span, plan: _Plan):
    """The reverse of ``_stacked``: for each unit in the span, (its rows in x [b, kv_heads, nq,
    group*bs, ...], the same rows in x_stacked), both [b, blocks, n, bs, ...] views."""
    for u, lo, hi, at in _span_blocks(stack, span, plan.nq):
        dst = _head_rows(x, stack, u, plan)[:, lo:hi]
        yield dst, x_stacked[:, u, at:at + hi - lo].view(dst.shape)


def _head_rows(x, stack: _Stack, u: int, plan: _Plan):
    """[b, kv_heads, nq, group*bs, ...] -> [b, nq, n, bs, ...] view: the rows of unit u's heads."""
    return x[:, stack.kv_heads[u]].unflatten(2, (plan.group, plan.block))[:, :, stack.heads[u]]


def _stacked_columns(t, stack: _Stack, plan: _Plan):
    """[b, kv_heads, T, d] whole key blocks -> [b, units, c*bs, d]: each unit's strided key blocks."""
    kv = torch.tensor(stack.kv_heads, device=t.device).view(-1, 1)
    return t.unflatten(2, (-1, plan.block))[:, kv, stack.col_blocks].flatten(2, 3)


def _run_rows(x, span: _Span, run: _Run, parts: int):
    """[b, units, span blocks, n*bs, ...] -> the run's rows as the kernel's [batch, units, rows,
    ...]: [b, units, rows, ...], or with b = 1 and ``parts`` > 1 [parts, units, rows / parts, ...],
    so that the kernel's backward (parallel over batch x units) has work for every thread."""
    x = x[:, :, run.k0 - span.k0:run.k1 - span.k0].flatten(2, 3)
    return x if parts == 1 else x[0].unflatten(1, (parts, -1)).transpose(0, 1)


def _parts(stack: _Stack, run: _Run, batch: int, rows: int) -> int:
    """Parts to split a run's rows into for its backward call (``rows`` per stack block): the
    kernel's backward is parallel over batch x heads only, so with one sequence and fewer units
    than threads the rows go in parts side by side (their dK/dV summed after)."""
    return 1 if batch > 1 else math.gcd((run.k1 - run.k0) * rows, -(-torch.get_num_threads() // len(stack.heads)))


def _attention_rows(plan: _Plan, q, k, v, scale):
    """Forward on block rows: q [b, kv_heads, nq, group*bs, d], k/v [b, kv_heads, whole key blocks *
    bs, d] -> (out like q, lse like q without d): the band first, then each strided span merged
    into it."""
    out, lse = torch.empty_like(q), _new_rows(q)
    for bi, call in itertools.product(range(q.shape[0]), plan.band_calls):
        m0, m1 = call.m0, call.m1
        (k_w, start, _), (v_w, _, _) = (_window_keys(t[bi], plan, m0, m1) for t in (k, v))
        entries = (m1 - m0) // call.superblock
        o, l = _attend(_band_rows(q[bi], call, m0, m1), _windows(k_w, start, plan, call, entries),
                       _windows(v_w, start, plan, call, entries), _additive(call.allowed, q.dtype), scale)
        _band_rows(out[bi], call, m0, m1).copy_(o)
        _band_rows(lse[bi], call, m0, m1).copy_(l)
    for stack in plan.stacks:
        k_cols, v_cols = _stacked_columns(k, stack, plan), _stacked_columns(v, stack, plan)
        buffers = [_stack_buffer(x, stack, plan) for x in (q, q, lse)]
        for span in stack.spans:
            sq = _stacked(q, stack, span, plan, buffers[0])
            s_out, s_lse = _in_span(buffers[1], span).zero_(), _in_span(buffers[2], span).fill_(_NEG_INF)
            for run in span.runs:
                cols = slice(run.c0 * plan.block, run.cols * plan.block)
                o, l = _attend(_run_rows(sq, span, run, 1), k_cols[:, :, cols], v_cols[:, :, cols],
                               _additive(run.keys_ok, q.dtype), scale)
                if run.c0 == 0:           # the rows' first call in this span (later ones merge)
                    _run_rows(s_out, span, run, 1).copy_(o)
                    _run_rows(s_lse, span, run, 1).copy_(l)
                else:
                    _merge_(_run_rows(s_out, span, run, 1), _run_rows(s_lse, span, run, 1), o, l)
            for (o, s_o), (l, s_l) in zip(_unstacked(out, s_out, stack, span, plan),
                                          _unstacked(lse, s_lse, stack, span, plan)):
                _merge_(o, l, s_o, s_l)
    return out, lse


def _merge_(out_a, lse_a, out_b, lse_b):
    """Two partial attentions over disjoint keys -> the whole one, in place in (out_a, lse_a)
    (``merge.merge_attention``'s rule; not differentiable): out [..., d], lse [...]."""
    lse = torch.logaddexp(lse_a, lse_b)
    out_a.lerp_(out_b, torch.exp(lse_b - torch.where(torch.isfinite(lse), lse, 0.0)).unsqueeze(-1))
    lse_a.copy_(lse)


def _attention_rows_backward(plan: _Plan, do, q, k, v, out, lse, scale):
    """Backward on block rows (shapes as ``_attention_rows``; lse +inf on rows that saw no key):
    (dq like q, dk and dv like k, token major)."""
    b, kv_heads, d, bs, W = q.shape[0], k.shape[1], q.shape[-1], plan.block, plan.window
    dq, dk, dv = torch.empty_like(q), _new_keys(k, k.shape[2]), _new_keys(v, v.shape[2])
    for bi, call in itertools.product(range(b), plan.band_calls):
        G, mask = call.superblock, _additive(call.allowed, q.dtype)
        # The band's dK/dV come per window (G+W-1 blocks per entry): small calls keep them in cache.
        step = G * max(1, _BAND_GRAD_ELEMENTS // (kv_heads * (G + W - 1) * bs * d))
        for m0 in range(call.m0, call.m1, step):
            m1, rows = min(call.m1, m0 + step), lambda x: _band_rows(x[bi], call, m0, m1)
            (k_w, start, overlap), (v_w, _, _) = (_window_keys(t[bi], plan, m0, m1) for t in (k, v))
            entries = (m1 - m0) // G
            dq_c, dk_c, dv_c = _attend_backward(
                rows(do), rows(q), _windows(k_w, start, plan, call, entries), _windows(v_w, start, plan, call, entries),
                rows(out), rows(lse), mask if mask.shape[0] == 1 else mask[m0 - call.m0:m1 - call.m0], scale)
            rows(dq).copy_(dq_c)
            for grad, window_grad in ((dk[bi], dk_c), (dv[bi], dv_c)):
                if overlap is None:
                    _fold_(grad, window_grad, start, G, bs)
                else:                      # through the padded copy's blocks
                    padded = _fold_(torch.zeros_like(k_w), window_grad, start, G, bs)
                    grad[:, overlap[0]] += padded[:, overlap[1]]
    for stack in plan.stacks:
        k_cols, v_cols = _stacked_columns(k, stack, plan), _stacked_columns(v, stack, plan)
        dk_cols, dv_cols = torch.zeros_like(k_cols), torch.zeros_like(v_cols)
        buffers = [_stack_buffer(x, stack, plan) for x in (do, q, out, lse, q)]
        for span in stack.spans:
            s_do, sq, s_out, s_lse = (_stacked(x, stack, span, plan, buf) for x, buf in zip((do, q, out, lse), buffers))
            s_dq = _in_span(buffers[4], span).zero_()
            for run in span.runs:
                cols, p = slice(run.c0 * bs, run.cols * bs), _parts(stack, run, b, sq.shape[3])
                k_r, v_r = (t[:, :, cols] if p == 1 else t[:, :, cols].expand(p, -1, -1, -1) for t in (k_cols, v_cols))
                dq_r, dk_r, dv_r = _attend_backward(*(_run_rows(x, span, run, p) for x in (s_do, sq)), k_r, v_r,
                                                    *(_run_rows(x, span, run, p) for x in (s_out, s_lse)),
                                                    _additive(run.keys_ok, q.dtype), scale)
                _run_rows(s_dq, span, run, p).add_(dq_r)
                dk_cols[:, :, cols] += dk_r if p == 1 else dk_r.sum(0, keepdim=True)
                dv_cols[:, :, cols] += dv_r if p == 1 else dv_r.sum(0, keepdim=True)
            for dst, src in _unstacked(dq, s_dq, stack, span, plan):
                dst.add_(src)
        for u, (g, count) in enumerate(zip(stack.kv_heads, stack.col_counts)):
            for grad, cols in ((dk, dk_cols), (dv, dv_cols)):
                grad[:, g].unflatten(1, (-1, bs)).index_add_(1, stack.col_blocks[u, :count],
                                                              cols[:, u, :count * bs].unflatten(1, (-1, bs)))
    return dq, dk, dv


def _with_feature(x, value):
    """x [..., d] -> [..., d+1] with ``value`` (a number, or a tensor [...]) as the last feature."""
    last = x.new_full((*x.shape[:-1], 1), value) if isinstance(value, float) else value.unsqueeze(-1).to(x.dtype)
    return torch.cat([x, last], dim=-1)


class _S2TorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, head_offset, q_offset, kv_offset):
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, s_q, heads, d = q.shape
        plan = _plan(layout, s_q, k.shape[1], q_offset, kv_offset, head_offset, heads, q.device)
        q_rows = _block_rows(q, plan, dtype)
        k_blocks, v_blocks = _keys(k, plan, dtype), _keys(v, plan, dtype)
        out_rows, lse_rows = _attention_rows(plan, q_rows, k_blocks, v_blocks, scale)
        ctx.save_for_backward(q_rows, k_blocks, v_blocks, out_rows, lse_rows)
        ctx.plan, ctx.scale, ctx.shapes = plan, scale, (q.shape, q.dtype, k.shape, k.dtype)
        lse = _from_block_rows(lse_rows, s_q, plan, copy=False).transpose(1, 2).clone(memory_format=torch.contiguous_format)
        out = _from_block_rows(out_rows, s_q, plan, copy=q.dtype == dtype)    # else the cast makes a new one
        return out.to(q.dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_lse):
        q_rows, k_blocks, v_blocks, out_rows, lse_rows = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        (_, s_q, _, d), q_dtype, k_shape, k_dtype = ctx.shapes
        do_rows = _block_rows(d_out, plan, q_rows.dtype)
        lse_rows = torch.where(torch.isneginf(lse_rows), float("inf"), lse_rows)     # rows with no key: P = 0
        dlse_rows = _block_rows(d_lse.transpose(1, 2), plan, q_rows.dtype)
        if bool(dlse_rows.any()):                  # Delta - dlse, through one extra feature
            q_rows, k_blocks, v_blocks = (_with_feature(x, 0.0) for x in (q_rows, k_blocks, v_blocks))
            out_rows, do_rows = _with_feature(out_rows, -dlse_rows), _with_feature(do_rows, 1.0)
        dq, dk, dv = _attention_rows_backward(plan, do_rows, q_rows, k_blocks, v_blocks, out_rows, lse_rows, scale)
        dk, dv = (t[:, :, :k_shape[1], :d].transpose(1, 2).to(k_dtype) for t in (dk, dv))
        return _from_block_rows(dq[..., :d], s_q, plan, copy=False).to(q_dtype), dk, dv, None, None, None, None, None


def torch_attention(q, k, v, layout: S2Layout, softmax_scale: float, head_offset: int, q_offset: int,
                    kv_offset: int):
    """(out [b, s_q, h, d] like q, lse [b, h, s_q] float32, float64 for float64 q); see the module
    docstring. Needs s_q, s_kv and batch >= 1 (``s2_attention`` answers empty inputs itself)."""
    return _S2TorchFunction.apply(q, k, v, layout, softmax_scale, head_offset, q_offset, kv_offset)
