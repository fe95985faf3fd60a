"""The S2 attention config, the per-layer hybrid layout, and every model check that needs no
process group.

The hybrid layout is a string with one character per (global) transformer layer: ``S`` for an
S2-sparse layer, ``D`` for a dense one. Under pipeline parallelism each stage builds its own slice
of it, so a layer keeps its kind wherever the stage boundaries fall.

Checks raise ValueError naming the field and its value, so a bad recipe fails before any model is
built.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from s2attn import S2Layout
from s2attn.layout import HEAD_SHARDINGS

from .context_parallel import EXCHANGES

SPARSE, DENSE = "S", "D"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class S2AttentionConfig:
    """The S2 pattern of the sparse layers (one pattern for all of them); see s2attn.S2Layout."""

    block_size: int = 64
    """Tokens per block; a power of two >= 16. Sequence lengths must be multiples of it."""
    local_blocks: int = 16
    """Width of every head's local window in blocks, the diagonal block included."""
    vert_stride: int = 8
    """Each head also attends every ``vert_stride``-th older block, at its own residue."""
    head_sliding_offset: int = 0
    """Added to the strided term; 1 with head_sharding "query" reproduces Phi-3-small's layout."""
    head_sliding_step: int | None = None
    """Residue shift between consecutive sharding heads; None means max(1, vert_stride // n), n the
    kv heads ("kv") or query heads ("query"). The S2 authors' library uses n = query heads even
    with grouped K/V: head_sliding_step = max(1, vert_stride // num_heads) reproduces it."""
    num_dense_heads: int = 0
    """The last ``num_dense_heads`` kv heads (global indices), so all their query heads, attend
    every causal block."""
    homo_head: bool = False
    """Every head uses the first head's strided residue (the context is not sharded over heads)."""
    head_sharding: str = "kv"
    """What gives a head its strided residue: "kv" (its kv head: a GQA group shares one) or "query"
    (every query head its own, as Phi-3-small; K/V stay grouped)."""
    allow_uncovered_context: bool = False
    """Accept a pattern whose heads together leave older blocks unseen (e.g. a window-only
    baseline); otherwise ``validate_hybrid_model`` rejects it."""
    cp_exchange: str = "sparse"
    """Under context parallelism, how sparse layers bring the keys of other ranks: "sparse" (only
    the blocks the pattern reads) or "all_gather" (everything; the baseline)."""

    def __post_init__(self) -> None:
        bs = self.block_size
        _require(_is_int(bs) and bs >= 16 and bs & (bs - 1) == 0,
                 f"s2.block_size must be a power of two >= 16, got {bs!r}")
        for name in ("local_blocks", "vert_stride"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, f"s2.{name} must be an integer >= 1, got {value!r}")
        _require(_is_int(self.head_sliding_offset),
                 f"s2.head_sliding_offset must be an integer, got {self.head_sliding_offset!r}")
        _require(self.cp_exchange in EXCHANGES,
                 f"s2.cp_exchange must be one of {EXCHANGES}, got {self.cp_exchange!r}")
        step = self.head_sliding_step
        _require(step is None or (_is_int(step) and step >= 0),
                 f"s2.head_sliding_step must be None or an integer >= 0, got {step!r}")
        _require(_is_int(self.num_dense_heads) and self.num_dense_heads >= 0,
                 f"s2.num_dense_heads must be an integer >= 0, got {self.num_dense_heads!r}")
        _require(isinstance(self.homo_head, bool), f"s2.homo_head must be a bool, got {self.homo_head!r}")
        _require(self.head_sharding in HEAD_SHARDINGS,
                 f"s2.head_sharding must be one of {HEAD_SHARDINGS}, got {self.head_sharding!r}")
        _require(isinstance(self.allow_uncovered_context, bool),
                 f"s2.allow_uncovered_context must be a bool, got {self.allow_uncovered_context!r}")

    def to_layout(self, num_heads: int, num_kv_heads: int) -> S2Layout:
        """The kernel's pattern for a layer with these (global, unsharded) head counts. Coverage of
        the context is ``validate_hybrid_model``'s to judge, so S2Layout's warning is not repeated."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="S2 heads do not cover")
            return S2Layout(num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=self.block_size,
                            local_blocks=self.local_blocks, vert_stride=self.vert_stride,
                            head_sliding_offset=self.head_sliding_offset,
                            head_sliding_step=self.head_sliding_step,
                            num_dense_heads=self.num_dense_heads, homo_head=self.homo_head,
                            head_sharding=self.head_sharding)


def check_layout(layout: str, num_layers: int) -> None:
    """The layout is a string of S/D with one character per layer."""
    _require(isinstance(layout, str), f"layout must be a string of S/D, got {layout!r}")
    bad = sorted(set(layout) - {SPARSE, DENSE})
    _require(not bad, f"layout {layout!r} may only contain 'S' (sparse) and 'D' (dense), found {bad}")
    _require(len(layout) == num_layers,
             f"layout {layout!r} has {len(layout)} characters but num_layers is {num_layers}")


def resolve_hybrid_layout(num_layers: int, layout: str | None = None, dense_every: int | None = None,
                          dense_layers: list[int] | None = None) -> str:
    """The S/D string, from exactly one of: ``layout`` itself; ``dense_every=k`` (layers 0, k, 2k,
    ... dense, e.g. k=4 over 8 layers gives ``DSSSDSSS``); ``dense_layers`` (0-based global layer
    numbers that are dense). With none given every layer is sparse."""
    _require(_is_int(num_layers) and num_layers >= 1, f"num_layers must be an integer >= 1, got {num_layers!r}")
    given = {name: value for name, value in
             (("layout", layout), ("dense_every", dense_every), ("dense_layers", dense_layers))
             if value is not None}
    _require(len(given) <= 1, f"give at most one of layout, dense_every, dense_layers; got {given}")
    if layout is not None:
        check_layout(layout, num_layers)
        return layout
    dense = set()
    if dense_every is not None:
        _require(_is_int(dense_every) and dense_every >= 1,
                 f"dense_every must be an integer >= 1, got {dense_every!r}")
        dense = set(range(0, num_layers, dense_every))
    if dense_layers is not None:
        layers = list(dense_layers)
        _require(all(_is_int(i) and 0 <= i < num_layers for i in layers),
                 f"dense_layers {layers} must be layer numbers in [0, num_layers={num_layers})")
        _require(len(set(layers)) == len(layers), f"dense_layers {layers} has duplicates")
        dense = set(layers)
    return "".join(DENSE if i in dense else SPARSE for i in range(num_layers))


def check_heads(num_attention_heads: int, num_query_groups: int | None,
                tensor_model_parallel_size: int) -> None:
    """Heads and kv groups split evenly over TP ranks (every rank owns whole kv groups)."""
    groups = num_attention_heads if num_query_groups is None else num_query_groups
    tp = tensor_model_parallel_size
    _require(_is_int(tp) and tp >= 1, f"tensor_model_parallel_size must be an integer >= 1, got {tp!r}")
    _require(_is_int(groups) and groups >= 1, f"num_query_groups must be an integer >= 1, got {groups!r}")
    _require(num_attention_heads % groups == 0,
             f"num_attention_heads ({num_attention_heads}) must be a multiple of num_query_groups ({groups})")
    _require(num_attention_heads % tp == 0,
             f"num_attention_heads ({num_attention_heads}) must be a multiple of "
             f"tensor_model_parallel_size ({tp})")
    _require(groups % tp == 0,
             f"num_query_groups ({groups}) must be a multiple of tensor_model_parallel_size ({tp})")


def validate_hybrid_model(*, num_layers: int, num_attention_heads: int, num_query_groups: int | None,
                          tensor_model_parallel_size: int, seq_length: int, s2: S2AttentionConfig,
                          layout: str, context_parallel_size: int = 1) -> None:
    """Every model/parallel check that needs no process group; ValueError naming fields and values.

    Under context parallelism the sequence is cut into 2*cp chunks, each a whole number of blocks,
    so seq_length must be a multiple of 2 * context_parallel_size * block_size. The heads together
    must see every causal block pair at seq_length (the S2 design rule) unless
    s2.allow_uncovered_context.
    """
    check_layout(layout, num_layers)
    check_heads(num_attention_heads, num_query_groups, tensor_model_parallel_size)
    _require(isinstance(s2, S2AttentionConfig), f"s2 must be an S2AttentionConfig, got {type(s2).__name__}")
    groups = num_attention_heads if num_query_groups is None else num_query_groups
    _require(s2.num_dense_heads <= groups,
             f"s2.num_dense_heads ({s2.num_dense_heads}) must be <= the kv heads, "
             f"num_query_groups ({groups})")
    cp = context_parallel_size
    _require(_is_int(cp) and cp >= 1, f"context_parallel_size must be an integer >= 1, got {cp!r}")
    unit = s2.block_size if cp == 1 else 2 * cp * s2.block_size
    what = "s2.block_size" if cp == 1 else f"2 * context_parallel_size ({cp}) * s2.block_size"
    _require(_is_int(seq_length) and seq_length >= 1 and seq_length % unit == 0,
             f"seq_length ({seq_length!r}) must be a positive multiple of {what} = {unit}")
    if SPARSE in layout and not s2.allow_uncovered_context:
        check_context_coverage(s2, num_attention_heads, groups, seq_length)


def check_context_coverage(s2: S2AttentionConfig, num_heads: int, num_kv_heads: int, seq_length: int) -> None:
    """The heads of an S layer together see every causal block pair of a seq_length sequence."""
    layout = s2.to_layout(num_heads, num_kv_heads)
    unseen = layout.unseen_block_pairs(seq_length)
    n = seq_length // s2.block_size
    _require(unseen == 0,
             f"{unseen} of {n * (n + 1) // 2} causal block pairs at seq_length {seq_length} are seen by no "
             f"head: attention.s2.vert_stride ({s2.vert_stride}) has residues that no head takes with "
             f"attention.s2.head_sharding={s2.head_sharding!r}, {num_heads} query / {num_kv_heads} kv heads, "
             f"step {layout.step}. Fix: attention.s2.head_sharding=query, a smaller attention.s2.vert_stride, "
             f"attention.s2.num_dense_heads >= 1, or attention.s2.allow_uncovered_context=true to accept it")
