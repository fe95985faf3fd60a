"""S2 block-sparse causal attention in Triton: forward and backward, FlashAttention-2 style.

What the kernels compute, for every query head ``h`` of ``q`` and its kv head
``g = (head_offset + h) // group_size``: softmax attention over exactly the keys of
``S2Layout`` (local window, the query head's strided residue under either ``head_sharding``, dense
kv heads, ``homo_head``) with token-level causality (key position <= query position) and keys past
``s_kv`` masked. The forward saves the log-sum-exp; the backward is differentiable through both
``out`` and ``lse``. Packed documents (``triton_packed_attention``, THD with cu_seqlens): each
document is attended as its own sequence from position 0, all documents in one launch per kernel.

How:
- The pattern is compiled once per (layout, lengths, offsets, head range, tile shape, device) into
  a CSR-like index (``_sparse_index``): for each query head and each tile a program owns, the list
  of tiles of the other operand it must visit, fully-active tiles first. The index is the union over
  the S2 blocks inside a tile, so a tile may hold several blocks (Merge-Q when ``block_size`` is
  smaller than a tensor-core tile); the exact mask is then evaluated in-kernel from the formula
  (``_s2_active``), and skipped on fully-active tiles (the ``MASKED`` constexpr).
- Forward: one program per (query tile, batch, head) runs an online softmax over its kv tiles.
- Backward: a preprocess computes ``Delta = rowsum(O * dO) - dlse`` (the ``- dlse`` term carries
  the gradient of ``lse``); dQ is computed by rows (one program per query tile) and dK/dV by
  columns. A kv tile's dK/dV work is the concatenation, over the query heads of its kv head in a
  fixed order, of their visited query tiles (each head with its own list and mask). A strided key
  tile is read by every later query tile, a local-only one by a window's worth, so that work is
  cut into chunks of bounded length (``_DkdvWork``, the bound from the index); a tile's only chunk
  writes dK/dV, the chunks of a split tile write fp32 partials that a reduce kernel sums in chunk
  order. Each gradient element has one writer and a fixed summation order: deterministic, no
  atomics, GQA without expanding K/V. Key tiles that no query reads (context parallelism) get no
  program.
- Packed documents (the ``VARLEN`` constexpr of the same kernels): a document's index depends only
  on its lengths, so the pack's index (``_document_index``) is the per-document ``_sparse_index``
  of each distinct (s_q, s_kv), with one item (document, owned tile) per program: the grid covers
  the documents' tiles only, and a program reads its document's rows from cu_seqlens. The dK/dV
  chunks are cut over the items of the whole pack with one bound. Host syncs: none here when the
  tuple of lengths was seen before (the lists are cached on it; ``s2_attention`` itself reads
  cu_seqlens back once per call); a new tuple builds the lists on the host from the lengths and
  copies them to the device with plain ``.to(device)`` copies, each of which waits for the
  device: syncs happen only for a new tuple, for each of its tile shapes (forward, dQ, dK/dV).

Limits: head_dim in {16, 32, 64, 128, 256}; block_size 16..128; fp16 / bf16 (fp32 accumulation)
and fp32 (IEEE dots, slow; meant for the interpreter); the last dim of q, k, v must be contiguous
(other strides are free: a transposed view of Megatron's [s, b, h, d] is read in place). CUDA
tensors, or CPU tensors when the module was imported with TRITON_INTERPRET=1. Packed
documents: the host builds the work lists of every new tuple of lengths, a loop over its distinct
lengths (roughly 4 ms per distinct length and tile shape at 8 heads, seen once on a busy CPU; the
per-document loop this replaces built the same per-length indices); GPU speed against that loop
is unmeasured.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

import torch
import triton
import triton.language as tl

from .layout import S2Layout

HEAD_DIMS = (16, 32, 64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = math.log2(math.e)
_DENSE_WINDOW = 1 << 30
"""Local window (in blocks) given to dense kv heads: it covers every causal block."""


# -- tile configurations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch settings of one kernel."""

    block_m: int
    """Query rows per tile."""
    block_n: int
    """Key rows per tile."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software-pipelining depth of the tile loop (shared-memory buffers per loaded operand)."""


@dataclass(frozen=True)
class TileConfigs:
    """The configurations of the five kernels for one (head_dim, block_size, dtype)."""

    forward: KernelConfig
    """``_s2_forward_kernel``: owns a query tile, visits kv tiles."""
    preprocess: KernelConfig
    """``_s2_backward_preprocess_kernel``: rows of Delta (block_n unused)."""
    backward_dq: KernelConfig
    """``_s2_backward_dq_kernel``: owns a query tile, visits kv tiles (same tiles as forward)."""
    backward_dkdv: KernelConfig
    """``_s2_backward_dkdv_kernel``: owns a chunk of a kv tile's work, visits query tiles."""
    backward_dkdv_reduce: KernelConfig
    """``_s2_backward_dkdv_reduce_kernel``: sums a split kv tile's partials (block_n as dK/dV's;
    block_m unused)."""


# fp16 / bf16 tiles per head_dim (16 and 32 use 64's), before capping the visited side at
# block_size. tests/test_triton_compile.py compiles every configuration tile_configs returns for
# sm_80 and sm_90: shared memory within sm_80's limit, no register spills on sm_90 (< 128 bytes on
# sm_80 for three of them).
_TILES = {
    64: TileConfigs(forward=KernelConfig(128, 64, 4, 3), preprocess=KernelConfig(64, 64, 4, 1),
                    backward_dq=KernelConfig(128, 64, 8, 3), backward_dkdv=KernelConfig(32, 128, 8, 3),
                    backward_dkdv_reduce=KernelConfig(128, 128, 4, 1)),
    128: TileConfigs(forward=KernelConfig(128, 64, 8, 3), preprocess=KernelConfig(64, 64, 4, 1),
                     backward_dq=KernelConfig(128, 64, 8, 3), backward_dkdv=KernelConfig(32, 64, 8, 3),
                     backward_dkdv_reduce=KernelConfig(64, 64, 4, 1)),
    256: TileConfigs(forward=KernelConfig(64, 32, 8, 2), preprocess=KernelConfig(32, 32, 4, 1),
                     backward_dq=KernelConfig(64, 32, 8, 2), backward_dkdv=KernelConfig(32, 32, 8, 2),
                     backward_dkdv_reduce=KernelConfig(32, 32, 4, 1)),
}


def _fp32_tiles(config: KernelConfig) -> KernelConfig:
    """4-byte operands and IEEE dots (no tensor cores): tiles of <= 32 rows, no pipelining."""
    return replace(config, block_m=min(config.block_m, 32), block_n=min(config.block_n, 32), num_stages=1)


def tile_configs(head_dim: int, block_size: int, dtype: torch.dtype) -> TileConfigs:
    """Every configuration this module launches comes from here (the compile test iterates it).

    The side a program owns is a large tile (Merge-Q: several small S2 blocks share it, so tensor
    cores stay busy); the side it visits is at most one S2 block wide, so a strided block costs no
    wasted rows or columns. fp16 and bf16 share tiles; fp32 is the interpreter/test path.
    """
    tiles = _TILES[max(64, head_dim)]
    if dtype == torch.float32:
        tiles = TileConfigs(**{f.name: _fp32_tiles(getattr(tiles, f.name)) for f in fields(tiles)})
    return replace(
        tiles,
        forward=replace(tiles.forward, block_n=min(tiles.forward.block_n, block_size)),
        backward_dq=replace(tiles.backward_dq, block_n=min(tiles.backward_dq.block_n, block_size)),
        backward_dkdv=replace(tiles.backward_dkdv, block_m=min(tiles.backward_dkdv.block_m, block_size)),
        backward_dkdv_reduce=replace(tiles.backward_dkdv_reduce, block_n=tiles.backward_dkdv.block_n),
    )


# -- the pattern compiled into tile lists ----------------------------------------------------------
@dataclass(frozen=True)
class _SparseIndex:
    """For each (local query head, owned tile): the visited tiles, fully active first (CSR-like)."""

    tiles: torch.Tensor
    """int32 [nnz + 1]: visited tile indices (one trailing pad so the pointer is never null)."""
    bounds: torch.Tensor
    """int32 [heads, owned_tiles, 3]: start, first partially-masked entry, end into ``tiles``."""
    pattern: torch.Tensor
    """int32 [heads, 2]: strided residue and local window in blocks (huge for dense heads)."""


def _tile_reduce(blocks_ij: torch.Tensor, block_size: int, block_m: int, block_n: int,
                 num_m: int, num_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mask [q_blocks, kv_blocks] -> (any, all) over the blocks of each tile [num_m, num_n].

    Blocks are cut into units of min(block, tile) so that tiles smaller than a block work too;
    the last tile is padded with inactive units.
    """
    unit_m, unit_n = min(block_size, block_m), min(block_size, block_n)
    units = blocks_ij.repeat_interleave(block_size // unit_m, 0).repeat_interleave(block_size // unit_n, 1)
    per_m, per_n = block_m // unit_m, block_n // unit_n
    padded = units.new_zeros(num_m * per_m, num_n * per_n)
    rows, cols = min(units.shape[0], padded.shape[0]), min(units.shape[1], padded.shape[1])
    padded[:rows, :cols] = units[:rows, :cols]
    tiles = padded.view(num_m, per_m, num_n, per_n)
    return tiles.any(3).any(1), tiles.all(3).all(1)


@functools.lru_cache(maxsize=64)
def _sparse_index(layout: S2Layout, s_q: int, s_kv: int, q_offset: int, kv_offset: int,
                  head_offset: int, num_heads: int, block_m: int, block_n: int, by_kv: bool,
                  device: torch.device) -> _SparseIndex:
    """Compile the pattern for query heads [head_offset, +num_heads) into tile lists.

    ``by_kv`` False: owned tiles are query tiles (forward, dQ); True: kv tiles (dK/dV).
    A tile pair is listed if any token pair in it is active, and 'full' if every token pair is
    (all rows and columns in bounds, causal everywhere, every block pair active).
    """
    bs = layout.block_size
    num_m, num_n = triton.cdiv(s_q, block_m), triton.cdiv(s_kv, block_n)
    heads = range(head_offset, head_offset + num_heads)

    # token-level facts per tile pair, shared by all heads
    m = torch.arange(num_m, device=device).view(-1, 1)
    n = torch.arange(num_n, device=device).view(1, -1)
    q_first, q_last = q_offset + m * block_m, q_offset + torch.clamp((m + 1) * block_m, max=s_q) - 1
    k_first, k_last = kv_offset + n * block_n, kv_offset + (n + 1) * block_n - 1
    some_causal = k_first <= q_last
    all_causal = (k_last <= q_first) & ((m + 1) * block_m <= s_q) & ((n + 1) * block_n <= s_kv)

    any_list, full_list = [], []
    for h in heads:
        blocks_ij = layout.block_mask(triton.cdiv(s_q, bs), triton.cdiv(s_kv, bs), q_offset // bs,
                                      kv_offset // bs, head_offset=h, num_heads=1, device=device)[0]
        some, every = _tile_reduce(blocks_ij, bs, block_m, block_n, num_m, num_n)
        any_list.append(some & some_causal)
        full_list.append(every & all_causal)
    visit, full = torch.stack(any_list), torch.stack(full_list)          # [heads, num_m, num_n]
    if by_kv:
        visit, full = visit.transpose(1, 2), full.transpose(1, 2)
    owned = visit.shape[1]

    # (head, owned tile, visited tile) entries, full ones first; a stable sort by
    # (head, owned tile) keeps that order within each list
    entries = torch.cat([full.nonzero(), (visit & ~full).nonzero()])     # full implies visit
    tiles = entries[torch.argsort(entries[:, 0] * owned + entries[:, 1], stable=True), 2]
    count = visit.sum(2).reshape(-1)
    end = torch.cumsum(count, 0)
    start = end - count
    bounds = torch.stack([start, start + full.sum(2).reshape(-1), end], 1)

    pattern = torch.tensor([[layout.strided_residue(h),
                             _DENSE_WINDOW if layout.is_dense_head(h) else layout.local_blocks]
                            for h in heads], dtype=torch.int32, device=device)
    return _SparseIndex(tiles=torch.cat([tiles, tiles.new_zeros(1)]).int(),
                        bounds=bounds.view(num_heads, owned, 3).int(), pattern=pattern)


DKDV_CHUNK: int | None = None
"""Entries (visited query tiles) per dK/dV chunk program; None: ``dkdv_chunk_bound`` of the index.
Tests set a tiny bound to force splitting."""
_DKDV_MIN_CHUNK = 64
"""Floor of the chosen bound: a split costs one partial dK/dV write and read (2 fp32 tiles), about
what a few visits load, so short lists are not shredded."""


def dkdv_chunk_bound(work: torch.Tensor) -> int:
    """Entries per chunk for the per-tile work counts ``work`` (int [kv_heads, kv_tiles]): the
    mean over tiles with work, at least _DKDV_MIN_CHUNK. Every chunk is then at most the mean, and
    there are at most twice as many programs as busy tiles, so the heaviest program is at most
    about 2x the mean program."""
    busy = work[work > 0]
    mean = int(-(-int(busy.sum()) // max(1, busy.numel())))
    return max(_DKDV_MIN_CHUNK, mean)


@dataclass(frozen=True)
class _DkdvWork:
    """The dK/dV programs: each kv tile's work (over its kv head's query heads, in order, the
    visited-tile lists of the dK/dV ``_SparseIndex``) cut into near-equal chunks of at most
    ``chunk_bound`` entries; tiles without work get no program."""

    chunks: torch.Tensor
    """int32 [programs, 5]: kv tile, local kv head, first and end entry of the chunk in the tile's
    work, partial slot (-1: the tile's only chunk, which writes dK/dV itself). Longest first."""
    reduce: torch.Tensor
    """int32 [split tiles, 4]: kv tile, local kv head, first partial slot, number of slots (the
    tile's chunks in work order)."""
    num_partials: int
    idle_tiles: bool
    """Some (kv head, kv tile) has no work: dK/dV start zeroed."""
    chunk_bound: int


def _tile_work(bounds: torch.Tensor, kv_heads: int, head_phase: int, group_size: int) -> torch.Tensor:
    """long [kv_heads, kv_tiles]: entries of every kv tile's work, from a dK/dV index's bounds."""
    count = (bounds[..., 2] - bounds[..., 0]).long().cpu()               # [heads, kv_tiles]
    kv_head = (torch.arange(count.shape[0]) + head_phase) // group_size
    return torch.zeros(kv_heads, count.shape[1], dtype=torch.long).index_add_(0, kv_head, count)


def _split_work(work: torch.Tensor, chunk_bound: int, device) -> _DkdvWork:
    pieces = -(-work // chunk_bound)                                     # 0 for idle tiles
    c, n = pieces.nonzero(as_tuple=True)
    p, total = pieces[c, n], work[c, n]
    tile = torch.repeat_interleave(torch.arange(len(p)), p)              # the tile of each chunk
    k = torch.arange(len(tile)) - torch.repeat_interleave(torch.cumsum(p, 0) - p, p)
    lo, hi = k * total[tile] // p[tile], (k + 1) * total[tile] // p[tile]
    split = p > 1
    slot_base = torch.cumsum(torch.where(split, p, 0), 0) - torch.where(split, p, 0)
    slot = torch.where(split[tile], slot_base[tile] + k, -1)
    chunks = torch.stack([n[tile], c[tile], lo, hi, slot], 1)
    chunks = chunks[torch.argsort(hi - lo, descending=True, stable=True)]
    reduce = torch.stack([n, c, slot_base, p], 1)[split]
    return _DkdvWork(chunks=chunks.int().to(device), reduce=reduce.int().to(device),
                     num_partials=int(p[split].sum()), idle_tiles=bool((work == 0).any()),
                     chunk_bound=chunk_bound)


@functools.lru_cache(maxsize=64)
def _dkdv_work(layout: S2Layout, s_q: int, s_kv: int, q_offset: int, kv_offset: int, head_offset: int,
               num_heads: int, block_m: int, block_n: int, chunk_bound: int | None,
               device: torch.device) -> tuple[_SparseIndex, _DkdvWork]:
    """The dK/dV index (arguments as ``_sparse_index``) and its programs; ``chunk_bound`` None
    chooses it with ``dkdv_chunk_bound``."""
    index = _sparse_index(layout, s_q, s_kv, q_offset, kv_offset, head_offset, num_heads, block_m,
                          block_n, True, device)
    return index, _chunked_work(index, layout, head_offset, num_heads, chunk_bound, device)


def _chunked_work(index: _SparseIndex, layout: S2Layout, head_offset: int, num_heads: int,
                  chunk_bound: int | None, device: torch.device) -> _DkdvWork:
    """The dK/dV programs of a dK/dV index (whose owned tiles may be a pack's items)."""
    group = layout.group_size
    kv_heads = (head_offset + num_heads - 1) // group - head_offset // group + 1
    work = _tile_work(index.bounds, kv_heads, head_offset % group, group)
    return _split_work(work, chunk_bound or dkdv_chunk_bound(work), device)


# -- packed documents ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _document_index(layout: S2Layout, q_lengths: tuple[int, ...], kv_lengths: tuple[int, ...],
                    head_offset: int, num_heads: int, block_m: int, block_n: int, by_kv: bool,
                    device: torch.device) -> tuple[_SparseIndex, torch.Tensor]:
    """The index of a pack of documents (each from position 0) and its items.

    items: int32 [items, 2], (document, owned tile) for every owned tile of every document in
    document order (a document without rows on the owned side has none). The index's bounds are
    [heads, items, 3]; its tile lists are those of ``_sparse_index`` of each distinct (s_q, s_kv),
    stored once each. Built on the host from the lengths alone, then copied to ``device`` once.
    """
    cpu = torch.device("cpu")
    if device != cpu:
        index, items = _document_index(layout, q_lengths, kv_lengths, head_offset, num_heads, block_m,
                                       block_n, by_kv, cpu)
        return _SparseIndex(*(t.to(device) for t in (index.tiles, index.bounds, index.pattern))), items.to(device)
    stored, tiles, bounds, items = {}, [], [], []     # stored: (s_q, s_kv) -> (index, its first entry)
    for doc, lengths in enumerate(zip(q_lengths, kv_lengths)):
        owned = triton.cdiv(lengths[1], block_n) if by_kv else triton.cdiv(lengths[0], block_m)
        if owned == 0:
            continue
        if lengths not in stored:
            index = _sparse_index(layout, *lengths, 0, 0, head_offset, num_heads, block_m, block_n, by_kv, cpu)
            stored[lengths] = index, sum(len(t) for t in tiles)
            tiles.append(index.tiles[:-1])
        index, first = stored[lengths]
        bounds.append(index.bounds + first)
        items.append(torch.stack([torch.full((owned,), doc), torch.arange(owned)], 1))
    return (_SparseIndex(tiles=torch.cat([*tiles, tiles[0].new_zeros(1)]), bounds=torch.cat(bounds, 1),
                         pattern=index.pattern), torch.cat(items).int())


@functools.lru_cache(maxsize=16)
def _document_dkdv_work(layout: S2Layout, q_lengths: tuple[int, ...], kv_lengths: tuple[int, ...],
                        head_offset: int, num_heads: int, block_m: int, block_n: int,
                        chunk_bound: int | None, device: torch.device
                        ) -> tuple[_SparseIndex, torch.Tensor, _DkdvWork]:
    """``_document_index`` (by kv) and its dK/dV programs: the work of every kv tile of every
    document, cut with one chunk bound (``dkdv_chunk_bound`` over the whole pack when None)."""
    cpu_index, _ = _document_index(layout, q_lengths, kv_lengths, head_offset, num_heads, block_m, block_n,
                                   True, torch.device("cpu"))
    index, items = _document_index(layout, q_lengths, kv_lengths, head_offset, num_heads, block_m, block_n,
                                   True, device)
    return index, items, _chunked_work(cpu_index, layout, head_offset, num_heads, chunk_bound, device)


# -- kernels ---------------------------------------------------------------------------------------
# Pattern arguments shared by the kernels: ``residue`` and ``window`` of a query head (from
# _SparseIndex.pattern), ``vert_stride`` and ``block_size`` of the layout. Positions are absolute
# token positions (q_offset / kv_offset added).

@triton.jit
def _s2_active(q_pos, k_pos, kv_end, residue, window, vert_stride, block_size):
    """Exact S2 mask for broadcastable absolute positions ([M, 1] x [1, N] or transposed); the
    block arithmetic runs on the vectors, only the comparisons on the full tile."""
    q_blk = q_pos // block_size
    k_blk = k_pos // block_size
    pattern = (q_blk - k_blk < window) | (k_blk % vert_stride == residue)
    return pattern & (k_pos <= q_pos) & (k_pos < kv_end)


@triton.jit
def _load_rows(base, stride_s, start, seqlen, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               MASKED: tl.constexpr):
    """[BLOCK, HEAD_DIM] tile of rows start.. of a [seq, head_dim] matrix; rows past seqlen are 0."""
    rows = tl.arange(0, BLOCK)
    ptrs = base + start.to(tl.int64) * stride_s + rows[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=(start + rows < seqlen)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(base, stride_s, start, seqlen, tile, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    ptrs = base + start.to(tl.int64) * stride_s + rows[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(start + rows < seqlen)[:, None])


@triton.jit
def _load_row_stats(lse_base, delta_base, start, seqlen, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """lse (base 2) and Delta of rows start..; rows past seqlen and rows that see no key (lse -inf)
    get lse +inf, so p = exp2(s - lse) is 0 there without inf arithmetic."""
    rows = start + tl.arange(0, BLOCK)
    if MASKED:
        lse = tl.load(lse_base + rows, mask=rows < seqlen, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(delta_base + rows, mask=rows < seqlen, other=0.0)
    else:  # a fully active tile: every row sees keys
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    return lse * 1.4426950408889634, delta


@triton.jit
def _owned_tile(bounds_ptr, pattern_ptr, head, tile, num_tiles):
    """(first, first partially-masked, end) into the visited-tile list of local query head
    ``head`` and owned tile ``tile`` (of ``num_tiles``), and the head's residue and window."""
    row = bounds_ptr + (head * num_tiles + tile) * 3
    pattern = pattern_ptr + 2 * head
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(pattern), tl.load(pattern + 1)


@triton.jit
def _owned_item(items_ptr, item, VARLEN: tl.constexpr, RELOAD: tl.constexpr = False):
    """(document, owned tile) of item ``item``: row ``item`` of a pack's items (int32 [items, 2]),
    else (0, item), a tile of the one sequence. ``RELOAD``: a volatile load, which the compiler
    does not merge with an earlier one, so that the values need no registers in between."""
    if VARLEN:
        doc, tile = tl.load(items_ptr + 2 * item, volatile=RELOAD), tl.load(items_ptr + 2 * item + 1, volatile=RELOAD)
    else:
        doc, tile = 0, item
    return doc, tile


@triton.jit
def _document_rows(cu_seqlens_ptr, doc, seqlen, VARLEN: tl.constexpr, RELOAD: tl.constexpr = False):
    """(first row, length) of document ``doc`` of a pack, from cu_seqlens (int32 [docs + 1]);
    else (0, seqlen), the one sequence. ``RELOAD`` as in ``_owned_item``."""
    if VARLEN:
        begin = tl.load(cu_seqlens_ptr + doc, volatile=RELOAD)
        length = tl.load(cu_seqlens_ptr + doc + 1, volatile=RELOAD) - begin
        begin = begin.to(tl.int64)
    else:
        begin, length = 0, seqlen
    return begin, length


@triton.jit
def _forward_kv_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, stride_ks, stride_vs, seqlen_k,
                      kv_offset, tiles_ptr, first, last, residue, window, vert_stride, block_size,
                      qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax update of one query tile over the kv tiles tiles[first:last]."""
    offs_n = tl.arange(0, BLOCK_N)
    for idx in range(first, last):
        start_n = tl.load(tiles_ptr + idx) * BLOCK_N
        k = _load_rows(k_base, stride_ks, start_n, seqlen_k, BLOCK_N, HEAD_DIM, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if MASKED:
            k_pos = kv_offset + start_n + offs_n
            s = tl.where(_s2_active(q_pos[:, None], k_pos[None, :], kv_offset + seqlen_k,
                                    residue, window, vert_stride, block_size), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, stride_vs, start_n, seqlen_k, BLOCK_N, HEAD_DIM, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _s2_forward_kernel(
    # q, out: [batch, s_q, heads, head_dim]; k, v: [batch, s_kv, kv_heads, head_dim] (strides in
    # elements, last dim contiguous); lse: float32 [batch, heads, s_q], contiguous
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    # sparse index (_SparseIndex; owned tiles = query tiles, or a pack's items, = grid axis 0)
    tiles_ptr, bounds_ptr, pattern_ptr,
    # packed documents (VARLEN; else None): items int32 [items, 2] (document, query tile), one per
    # program on axis 0; cu_seqlens_q / _kv int32 [docs + 1], rows of the batch-1 q and k, v
    items_ptr, cu_seqlens_q_ptr, cu_seqlens_kv_ptr,
    # heads: query head h uses local kv head (head_phase + h) // group_size, where
    # head_phase = head_offset % group_size
    num_heads, head_phase, group_size,
    # sequence: lengths (of the whole pack with VARLEN), absolute position of the first query /
    # key (0 with VARLEN: each document starts at 0), layout block facts
    seqlen_q, seqlen_k, q_offset, kv_offset, block_size, vert_stride,
    qk_scale,  # softmax_scale * log2(e): the kernel works in base 2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // num_heads).to(tl.int64), (pid_bh % num_heads).to(tl.int64)
    c = (head_phase + h) // group_size
    doc, pid_m = _owned_item(items_ptr, tl.program_id(0), VARLEN)
    q_begin, len_q = _document_rows(cu_seqlens_q_ptr, doc, seqlen_q, VARLEN)
    kv_begin, len_k = _document_rows(cu_seqlens_kv_ptr, doc, seqlen_k, VARLEN)
    start_m = pid_m * BLOCK_M
    q_pos = q_offset + start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh + q_begin * stride_qs, stride_qs, start_m, len_q,
                   BLOCK_M, HEAD_DIM, True)
    k_base = k_ptr + b * stride_kb + c * stride_kh + kv_begin * stride_ks
    v_base = v_ptr + b * stride_vb + c * stride_vh + kv_begin * stride_vs
    first, mid, last, residue, window = _owned_tile(bounds_ptr, pattern_ptr, h, tl.program_id(0),
                                                    tl.num_programs(0))

    # A finite start for the running max keeps rows masked so far free of (-inf) - (-inf).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _forward_kv_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, stride_ks, stride_vs,
                                      len_k, kv_offset, tiles_ptr, first, mid, residue, window,
                                      vert_stride, block_size, qk_scale, BLOCK_N, HEAD_DIM, False)
    acc, m_i, l_i = _forward_kv_tiles(acc, m_i, l_i, q, q_pos, k_base, v_base, stride_ks, stride_vs,
                                      len_k, kv_offset, tiles_ptr, mid, last, residue, window,
                                      vert_stride, block_size, qk_scale, BLOCK_N, HEAD_DIM, True)

    seen = l_i > 0.0  # a row that sees no key: out 0, lse -inf
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    # A pack's query rows again: kept in registers through the loops, they spilled (head_dim 64, sm_90)
    doc, pid_m = _owned_item(items_ptr, tl.program_id(0), VARLEN, True)
    q_begin, len_q = _document_rows(cu_seqlens_q_ptr, doc, seqlen_q, VARLEN, True)
    start_m = pid_m * BLOCK_M
    _store_rows(out_ptr + b * stride_ob + h * stride_oh + q_begin * stride_os, stride_os, start_m, len_q,
                acc / l_safe[:, None], BLOCK_M, HEAD_DIM)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + (b * num_heads + h) * seqlen_q + q_begin + rows, lse, mask=rows < len_q)


@triton.jit
def _s2_backward_preprocess_kernel(
    # out, dout: [batch, s_q, heads, head_dim] (last dim contiguous); dlse: [batch, heads, s_q]
    # (any strides); delta: float32 [batch, heads, s_q], contiguous
    out_ptr, dout_ptr, dlse_ptr, delta_ptr,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_dlb, stride_dlh, stride_dls,
    num_heads, seqlen_q,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Delta = rowsum(O * dO) - dlse, so that dS = P * (dP - Delta) also carries d lse / dS = P."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // num_heads).to(tl.int64), (pid_bh % num_heads).to(tl.int64)
    start_m = pid_m * BLOCK_M
    o = _load_rows(out_ptr + b * stride_ob + h * stride_oh, stride_os, start_m, seqlen_q,
                   BLOCK_M, HEAD_DIM, True)
    do = _load_rows(dout_ptr + b * stride_dob + h * stride_doh, stride_dos, start_m, seqlen_q,
                    BLOCK_M, HEAD_DIM, True)
    rows = start_m + tl.arange(0, BLOCK_M)
    dlse = tl.load(dlse_ptr + b * stride_dlb + h * stride_dlh + rows * stride_dls,
                   mask=rows < seqlen_q, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(delta_ptr + (b * num_heads + h) * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _dq_kv_tiles(dq, q, do, lse2, delta, q_pos, k_base, v_base, stride_ks, stride_vs, seqlen_k,
                 kv_offset, tiles_ptr, first, last, residue, window, vert_stride, block_size,
                 qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """dQ of one query tile (before the softmax scale) accumulated over kv tiles[first:last]."""
    offs_n = tl.arange(0, BLOCK_N)
    for idx in range(first, last):
        start_n = tl.load(tiles_ptr + idx) * BLOCK_N
        k = _load_rows(k_base, stride_ks, start_n, seqlen_k, BLOCK_N, HEAD_DIM, MASKED)
        v = _load_rows(v_base, stride_vs, start_n, seqlen_k, BLOCK_N, HEAD_DIM, MASKED)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse2[:, None])
        if MASKED:
            k_pos = kv_offset + start_n + offs_n
            p = tl.where(_s2_active(q_pos[:, None], k_pos[None, :], kv_offset + seqlen_k,
                                    residue, window, vert_stride, block_size), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit
def _s2_backward_dq_kernel(
    # q, dout, dq: [batch, s_q, heads, head_dim]; k, v: [batch, s_kv, kv_heads, head_dim]
    # (last dim contiguous); lse, delta: float32 [batch, heads, s_q], contiguous
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    # sparse index (_SparseIndex; owned tiles = query tiles, or a pack's items, = grid axis 0)
    tiles_ptr, bounds_ptr, pattern_ptr,
    # packed documents, heads and sequence as in _s2_forward_kernel
    items_ptr, cu_seqlens_q_ptr, cu_seqlens_kv_ptr,
    num_heads, head_phase, group_size,
    seqlen_q, seqlen_k, q_offset, kv_offset, block_size, vert_stride,
    sm_scale, qk_scale,  # softmax scale, and it times log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // num_heads).to(tl.int64), (pid_bh % num_heads).to(tl.int64)
    c = (head_phase + h) // group_size
    doc, pid_m = _owned_item(items_ptr, tl.program_id(0), VARLEN)
    q_begin, len_q = _document_rows(cu_seqlens_q_ptr, doc, seqlen_q, VARLEN)
    kv_begin, len_k = _document_rows(cu_seqlens_kv_ptr, doc, seqlen_k, VARLEN)
    start_m = pid_m * BLOCK_M
    q_pos = q_offset + start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh + q_begin * stride_qs, stride_qs, start_m, len_q,
                   BLOCK_M, HEAD_DIM, True)
    do = _load_rows(dout_ptr + b * stride_dob + h * stride_doh + q_begin * stride_dos, stride_dos, start_m,
                    len_q, BLOCK_M, HEAD_DIM, True)
    stats = (b * num_heads + h) * seqlen_q + q_begin
    lse2, delta = _load_row_stats(lse_ptr + stats, delta_ptr + stats, start_m, len_q, BLOCK_M, True)
    k_base = k_ptr + b * stride_kb + c * stride_kh + kv_begin * stride_ks
    v_base = v_ptr + b * stride_vb + c * stride_vh + kv_begin * stride_vs
    first, mid, last, residue, window = _owned_tile(bounds_ptr, pattern_ptr, h, tl.program_id(0),
                                                    tl.num_programs(0))

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_kv_tiles(dq, q, do, lse2, delta, q_pos, k_base, v_base, stride_ks, stride_vs, len_k,
                      kv_offset, tiles_ptr, first, mid, residue, window, vert_stride, block_size,
                      qk_scale, BLOCK_N, HEAD_DIM, False)
    dq = _dq_kv_tiles(dq, q, do, lse2, delta, q_pos, k_base, v_base, stride_ks, stride_vs, len_k,
                      kv_offset, tiles_ptr, mid, last, residue, window, vert_stride, block_size,
                      qk_scale, BLOCK_N, HEAD_DIM, True)
    _store_rows(dq_ptr + b * stride_dqb + h * stride_dqh + q_begin * stride_dqs, stride_dqs, start_m, len_q,
                dq * sm_scale, BLOCK_M, HEAD_DIM)


@triton.jit
def _dkdv_q_tiles(dk, dv, k, v, k_pos, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                  seqlen_q, q_offset, kv_end, tiles_ptr, first, last, residue, window, vert_stride,
                  block_size, qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr):
    """dK (before the softmax scale) and dV of one kv tile from one query head's tiles[first:last].

    Works on transposed scores [BLOCK_N, BLOCK_M] so that dK and dV come out by rows of the kv tile.
    """
    offs_m = tl.arange(0, BLOCK_M)
    for idx in range(first, last):
        start_m = tl.load(tiles_ptr + idx) * BLOCK_M
        q = _load_rows(q_base, stride_qs, start_m, seqlen_q, BLOCK_M, HEAD_DIM, MASKED)
        do = _load_rows(do_base, stride_dos, start_m, seqlen_q, BLOCK_M, HEAD_DIM, MASKED)
        lse2, delta = _load_row_stats(lse_base, delta_base, start_m, seqlen_q, BLOCK_M, MASKED)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale - lse2[None, :])
        if MASKED:
            q_pos = q_offset + start_m + offs_m
            p_t = tl.where(_s2_active(q_pos[None, :], k_pos[:, None], kv_end,
                                      residue, window, vert_stride, block_size), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")
    return dk, dv


@triton.jit
def _partial_tile(partial_ptr, b, slot, num_partials, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pointers [BLOCK_N, HEAD_DIM] to the dK partial of (batch b, slot); dV's follows it."""
    base = partial_ptr + (b * num_partials + slot) * (2 * BLOCK_N * HEAD_DIM)
    return base + tl.arange(0, BLOCK_N)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _s2_backward_dkdv_kernel(
    # pointers and strides as in _s2_backward_dq_kernel; dk, dv like k, v
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    # sparse index (_SparseIndex per query head; owned tiles = kv tiles, or a pack's items, of
    # which there are num_items) and the chunk programs (_DkdvWork.chunks, one per grid axis 0);
    # partial: float32 [batch, num_partials, 2, BLOCK_N, HEAD_DIM], contiguous, the unscaled dK
    # and dV of chunks whose tile is split
    tiles_ptr, bounds_ptr, pattern_ptr, num_items, chunks_ptr, partial_ptr, num_partials,
    # packed documents as in _s2_forward_kernel (items: document, kv tile)
    items_ptr, cu_seqlens_q_ptr, cu_seqlens_kv_ptr,
    # heads as in _s2_forward_kernel, plus the number of kv heads of k
    num_heads, num_kv_heads, head_phase, group_size,
    # sequence as in _s2_forward_kernel
    seqlen_q, seqlen_k, q_offset, kv_offset, block_size, vert_stride,
    sm_scale, qk_scale,  # softmax scale, and it times log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr,
):
    """One chunk of one kv tile's work: entries [lo, hi) of the concatenation, over the query heads
    of its kv head in order, of their visited-tile lists. A tile's only chunk writes dK/dV; the
    chunks of a split tile write partials for _s2_backward_dkdv_reduce_kernel."""
    chunk = chunks_ptr + tl.program_id(0) * 5
    item, c, lo, hi, slot = tl.load(chunk), tl.load(chunk + 1), tl.load(chunk + 2), tl.load(chunk + 3), tl.load(chunk + 4)
    b, c = tl.program_id(1).to(tl.int64), c.to(tl.int64)
    doc, pid_n = _owned_item(items_ptr, item, VARLEN)
    q_begin, len_q = _document_rows(cu_seqlens_q_ptr, doc, seqlen_q, VARLEN)
    kv_begin, len_k = _document_rows(cu_seqlens_kv_ptr, doc, seqlen_k, VARLEN)
    start_n = pid_n * BLOCK_N
    k_pos = kv_offset + start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_ptr + b * stride_kb + c * stride_kh + kv_begin * stride_ks, stride_ks, start_n, len_k,
                   BLOCK_N, HEAD_DIM, True)
    v = _load_rows(v_ptr + b * stride_vb + c * stride_vh + kv_begin * stride_vs, stride_vs, start_n, len_k,
                   BLOCK_N, HEAD_DIM, True)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # The query heads of kv head c, in a fixed order, each with its own tile list and pattern:
    # deterministic without atomics. ``done`` counts the entries of the heads before h.
    done = 0
    for h in range(tl.maximum(c * group_size - head_phase, 0),
                   tl.minimum((c + 1) * group_size - head_phase, num_heads)):
        first, mid, last, residue, window = _owned_tile(bounds_ptr, pattern_ptr, h, item, num_items)
        lo_h, hi_h = first + lo - done, first + hi - done        # this chunk in head h's list
        q_base = q_ptr + b * stride_qb + h * stride_qh + q_begin * stride_qs
        do_base = dout_ptr + b * stride_dob + h * stride_doh + q_begin * stride_dos
        stats = (b * num_heads + h) * seqlen_q + q_begin
        dk, dv = _dkdv_q_tiles(dk, dv, k, v, k_pos, q_base, do_base, lse_ptr + stats,
                               delta_ptr + stats, stride_qs, stride_dos, len_q, q_offset,
                               kv_offset + len_k, tiles_ptr, tl.maximum(first, lo_h),
                               tl.minimum(mid, hi_h), residue, window, vert_stride, block_size,
                               qk_scale, BLOCK_M, HEAD_DIM, False)
        dk, dv = _dkdv_q_tiles(dk, dv, k, v, k_pos, q_base, do_base, lse_ptr + stats,
                               delta_ptr + stats, stride_qs, stride_dos, len_q, q_offset,
                               kv_offset + len_k, tiles_ptr, tl.maximum(mid, lo_h),
                               tl.minimum(last, hi_h), residue, window, vert_stride, block_size,
                               qk_scale, BLOCK_M, HEAD_DIM, True)
        done += last - first
    if slot < 0:
        _store_rows(dk_ptr + b * stride_dkb + c * stride_dkh + kv_begin * stride_dks, stride_dks, start_n,
                    len_k, dk * sm_scale, BLOCK_N, HEAD_DIM)
        _store_rows(dv_ptr + b * stride_dvb + c * stride_dvh + kv_begin * stride_dvs, stride_dvs, start_n,
                    len_k, dv, BLOCK_N, HEAD_DIM)
    else:
        dk_partial = _partial_tile(partial_ptr, b, slot, num_partials, BLOCK_N, HEAD_DIM)
        tl.store(dk_partial, dk)
        tl.store(dk_partial + BLOCK_N * HEAD_DIM, dv)


@triton.jit
def _s2_backward_dkdv_reduce_kernel(
    # dk, dv as in _s2_backward_dkdv_kernel; partial and num_partials too; reduce: _DkdvWork.reduce;
    # items and cu_seqlens_kv as in _s2_backward_dkdv_kernel (VARLEN; else None)
    dk_ptr, dv_ptr,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    partial_ptr, num_partials, reduce_ptr, items_ptr, cu_seqlens_kv_ptr,
    seqlen_k, sm_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr,
):
    """dK/dV of one split kv tile: its chunks' partials summed in chunk order (deterministic)."""
    row = reduce_ptr + tl.program_id(0) * 4
    item, c, first, count = tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    b, c = tl.program_id(1).to(tl.int64), c.to(tl.int64)
    doc, pid_n = _owned_item(items_ptr, item, VARLEN)
    kv_begin, len_k = _document_rows(cu_seqlens_kv_ptr, doc, seqlen_k, VARLEN)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for slot in range(first, first + count):
        dk_partial = _partial_tile(partial_ptr, b, slot, num_partials, BLOCK_N, HEAD_DIM)
        dk += tl.load(dk_partial)
        dv += tl.load(dk_partial + BLOCK_N * HEAD_DIM)
    start_n = pid_n * BLOCK_N
    _store_rows(dk_ptr + b * stride_dkb + c * stride_dkh + kv_begin * stride_dks, stride_dks, start_n, len_k,
                dk * sm_scale, BLOCK_N, HEAD_DIM)
    _store_rows(dv_ptr + b * stride_dvb + c * stride_dvh + kv_begin * stride_dvs, stride_dvs, start_n, len_k,
                dv, BLOCK_N, HEAD_DIM)


# -- host side -------------------------------------------------------------------------------------
INTERPRETED = not isinstance(_s2_forward_kernel, triton.runtime.jit.JITFunction)
"""True when this module was imported under TRITON_INTERPRET=1 (kernels run on CPU tensors)."""


@dataclass(frozen=True)
class _Problem:
    """Everything about one call except the tensors."""

    layout: S2Layout
    batch: int
    heads: int
    kv_heads: int
    s_q: int
    s_kv: int
    head_dim: int
    head_offset: int
    q_offset: int
    kv_offset: int
    softmax_scale: float
    configs: TileConfigs
    documents: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    """A pack (batch 1; s_q and s_kv its token counts): the query and key length of each document."""

    def index(self, config: KernelConfig, by_kv: bool, device: torch.device
              ) -> tuple[_SparseIndex, torch.Tensor | None, int]:
        """The sparse index, a pack's items (None: owned tile i is program i) and their count."""
        if self.documents is None:
            owned = triton.cdiv(self.s_kv, config.block_n) if by_kv else triton.cdiv(self.s_q, config.block_m)
            return _sparse_index(self.layout, self.s_q, self.s_kv, self.q_offset, self.kv_offset, self.head_offset,
                                 self.heads, config.block_m, config.block_n, by_kv, device), None, owned
        index, items = _document_index(self.layout, *self.documents, self.head_offset, self.heads, config.block_m,
                                       config.block_n, by_kv, device)
        return index, items, len(items)

    def dkdv_work(self, config: KernelConfig, device: torch.device
                  ) -> tuple[_SparseIndex, torch.Tensor | None, int, _DkdvWork]:
        """``index`` by kv, and the dK/dV programs."""
        if self.documents is None:
            index, work = _dkdv_work(self.layout, self.s_q, self.s_kv, self.q_offset, self.kv_offset,
                                     self.head_offset, self.heads, config.block_m, config.block_n, DKDV_CHUNK,
                                     device)
            return index, None, triton.cdiv(self.s_kv, config.block_n), work
        index, items, work = _document_dkdv_work(self.layout, *self.documents, self.head_offset, self.heads,
                                                 config.block_m, config.block_n, DKDV_CHUNK, device)
        return index, items, len(items), work

    def geometry(self, with_kv_heads: bool = False) -> tuple:
        """The kernels' geometry arguments, in their order."""
        group = self.layout.group_size
        kv_heads = (self.kv_heads,) if with_kv_heads else ()
        return (self.heads, *kv_heads, self.head_offset % group, group, self.s_q, self.s_kv,
                self.q_offset, self.kv_offset, self.layout.block_size, self.layout.vert_stride)

    def launch_options(self, config: KernelConfig) -> dict:
        """Tile constexprs and launch settings of a forward / dQ / dK-dV kernel."""
        return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=self.head_dim,
                    VARLEN=self.documents is not None, num_warps=config.num_warps, num_stages=config.num_stages)


def _bsh_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _forward(q, k, v, p: _Problem, cu_seqlens: tuple):
    cfg = p.configs.forward
    index, items, programs = p.index(cfg, False, q.device)
    out = torch.empty_like(q)  # keeps q's memory order, e.g. [s, b, h, d] for a transposed view
    lse = torch.empty(p.batch, p.heads, p.s_q, device=q.device, dtype=torch.float32)
    _s2_forward_kernel[(programs, p.batch * p.heads)](
        q, k, v, out, lse,
        *_bsh_strides(q), *_bsh_strides(k), *_bsh_strides(v), *_bsh_strides(out),
        index.tiles, index.bounds, index.pattern, items, *cu_seqlens,
        *p.geometry(), p.softmax_scale * _LOG2E,
        **p.launch_options(cfg))
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, p: _Problem, cu_seqlens: tuple):
    pre = p.configs.preprocess
    delta = torch.empty_like(lse)
    _s2_backward_preprocess_kernel[(triton.cdiv(p.s_q, pre.block_m), p.batch * p.heads)](
        out, dout, dlse, delta,
        *_bsh_strides(out), *_bsh_strides(dout), *dlse.stride(),
        p.heads, p.s_q,
        BLOCK_M=pre.block_m, HEAD_DIM=p.head_dim, num_warps=pre.num_warps, num_stages=pre.num_stages)

    scales = (p.softmax_scale, p.softmax_scale * _LOG2E)
    dq = torch.empty_like(q)
    cfg = p.configs.backward_dq
    index, items, programs = p.index(cfg, False, q.device)
    _s2_backward_dq_kernel[(programs, p.batch * p.heads)](
        q, k, v, dout, lse, delta, dq,
        *_bsh_strides(q), *_bsh_strides(k), *_bsh_strides(v), *_bsh_strides(dout), *_bsh_strides(dq),
        index.tiles, index.bounds, index.pattern, items, *cu_seqlens,
        *p.geometry(), *scales,
        **p.launch_options(cfg))

    cfg = p.configs.backward_dkdv
    index, items, num_items, work = p.dkdv_work(cfg, q.device)
    dk, dv = (torch.zeros_like(t) if work.idle_tiles else torch.empty_like(t) for t in (k, v))
    partial = torch.empty(p.batch, max(1, work.num_partials), 2, cfg.block_n, p.head_dim, device=q.device,
                          dtype=torch.float32)
    if len(work.chunks):
        _s2_backward_dkdv_kernel[(len(work.chunks), p.batch)](
            q, k, v, dout, lse, delta, dk, dv,
            *_bsh_strides(q), *_bsh_strides(k), *_bsh_strides(v), *_bsh_strides(dout),
            *_bsh_strides(dk), *_bsh_strides(dv),
            index.tiles, index.bounds, index.pattern, num_items, work.chunks, partial, work.num_partials,
            items, *cu_seqlens,
            *p.geometry(with_kv_heads=True), *scales,
            **p.launch_options(cfg))
    red = p.configs.backward_dkdv_reduce
    if len(work.reduce):
        _s2_backward_dkdv_reduce_kernel[(len(work.reduce), p.batch)](
            dk, dv, *_bsh_strides(dk), *_bsh_strides(dv), partial, work.num_partials, work.reduce,
            items, cu_seqlens[1], p.s_kv, p.softmax_scale,
            BLOCK_N=red.block_n, HEAD_DIM=p.head_dim, VARLEN=p.documents is not None,
            num_warps=red.num_warps, num_stages=red.num_stages)
    return dq, dk, dv


class _S2TritonAttention(torch.autograd.Function):
    """Differentiable in q, k, v; ``cu_seqlens`` (cu_seqlens_q, cu_seqlens_kv) of a pack, or
    (None, None)."""

    @staticmethod
    def forward(ctx, q, k, v, problem: _Problem, cu_seqlens: tuple):
        out, lse = _forward(q, k, v, problem, cu_seqlens)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.cu_seqlens = problem, cu_seqlens
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:  # e.g. an expanded scalar gradient
            dout = dout.contiguous()
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.problem, ctx.cu_seqlens)
        return dq, dk, dv, None, None


def _check_inputs(q, k, v, layout: S2Layout, head_offset: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got stride {t.stride(-1)} "
                             f"(shape {tuple(t.shape)}, strides {t.stride()})")
    if q.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {q.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if layout.block_size not in BLOCK_SIZES:
        raise ValueError(f"layout.block_size must be one of {BLOCK_SIZES} for the triton backend, "
                         f"got {layout.block_size}")
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"s_q ({q.shape[1]}) and s_kv ({k.shape[1]}) must be >= 1")
    group = layout.group_size
    kv_heads = (head_offset + q.shape[2] - 1) // group - head_offset // group + 1
    if k.shape[2] != kv_heads:
        raise ValueError(f"k has {k.shape[2]} kv heads; query heads [{head_offset}, "
                         f"{head_offset + q.shape[2]}) with group size {group} need {kv_heads}")
    if not (q.is_cuda or INTERPRETED):
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 at import), "
                         f"got device {q.device}")


def _problem(q, k, layout: S2Layout, softmax_scale: float, head_offset: int, q_offset: int,
             kv_offset: int, documents=None) -> _Problem:
    batch, s_q, heads, head_dim = q.shape
    return _Problem(layout, batch, heads, k.shape[2], s_q, k.shape[1], head_dim, head_offset, q_offset,
                    kv_offset, float(softmax_scale), tile_configs(head_dim, layout.block_size, q.dtype),
                    documents)


def triton_attention(q, k, v, layout: S2Layout, softmax_scale: float, head_offset: int,
                     q_offset: int, kv_offset: int):
    """S2 attention; returns (out like q, lse float32 [batch, heads, s_q]), differentiable in both.
    Needs s_q, s_kv and batch >= 1 (``s2_attention`` answers empty inputs itself).

    q: [batch, s_q, heads, head_dim]; k, v: [batch, s_kv, kv_heads, head_dim]; any strides with a
    contiguous last dim. See ``s2attn.s2_attention`` for the meaning of the offsets.
    """
    _check_inputs(q, k, v, layout, head_offset)
    problem = _problem(q, k, layout, softmax_scale, head_offset, q_offset, kv_offset)
    return _S2TritonAttention.apply(q, k, v, problem, (None, None))


def triton_packed_attention(q, k, v, layout: S2Layout, softmax_scale: float, head_offset: int,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor,
                            q_lengths: tuple[int, ...], kv_lengths: tuple[int, ...]):
    """S2 attention over packed documents, all of them in one launch per kernel; returns (out like
    q, lse float32 [heads, total_q]), differentiable in both.

    q: [total_q, heads, head_dim]; k, v: [total_kv, kv_heads, head_dim] (contiguous last dim);
    total_q, total_kv >= 1. cu_seqlens_q / _kv: int32 [docs + 1] on q's device, already checked
    (``s2attn.api.document_bounds``); q_lengths / kv_lengths: the same document lengths on the
    host (ints), which the kernels' work lists are built from (cached per tuple of lengths, so
    nothing is read back from the device here). Semantics as ``s2attn.s2_attention`` with cu_seqlens.
    """
    _check_inputs(q[None], k[None], v[None], layout, head_offset)
    if not (len(q_lengths) == len(kv_lengths) == cu_seqlens_q.numel() - 1 and sum(q_lengths) == q.shape[0]
            and sum(kv_lengths) == k.shape[0]):
        raise ValueError(f"q_lengths / kv_lengths ({len(q_lengths)} / {len(kv_lengths)} documents, "
                         f"{sum(q_lengths)} / {sum(kv_lengths)} tokens) must describe the pack "
                         f"({cu_seqlens_q.numel() - 1} documents, {q.shape[0]} / {k.shape[0]} tokens)")
    problem = _problem(q[None], k[None], layout, softmax_scale, head_offset, 0, 0,
                       (tuple(q_lengths), tuple(kv_lengths)))
    out, lse = _S2TritonAttention.apply(q[None], k[None], v[None], problem, (cu_seqlens_q, cu_seqlens_kv))
    return out[0], lse[0]


def dkdv_partial_bytes(layout: S2Layout, *, batch: int, s_q: int, s_kv: int, heads: int, head_dim: int,
                       dtype: torch.dtype, head_offset: int = 0, q_offset: int = 0, kv_offset: int = 0) -> int:
    """Bytes of the fp32 dK/dV partial buffer that the backward of ``triton_attention`` allocates
    for this call (arguments as there; ``heads`` this call's query heads), from the same work lists
    as ``_backward`` (``_Problem.dkdv_work``), built on the CPU: no GPU needed. Packed documents are
    not covered (their lists depend on the lengths of each pack)."""
    kv_heads = (head_offset + heads - 1) // layout.group_size - head_offset // layout.group_size + 1
    problem = _Problem(layout, batch, heads, kv_heads, s_q, s_kv, head_dim, head_offset, q_offset, kv_offset,
                       1.0, tile_configs(head_dim, layout.block_size, dtype))
    config = problem.configs.backward_dkdv
    *_, work = problem.dkdv_work(config, torch.device("cpu"))
    return batch * max(1, work.num_partials) * 2 * config.block_n * head_dim * 4
