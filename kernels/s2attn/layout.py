"""The S2 block-sparse pattern: which key blocks each query block of each head attends to.

Tokens are grouped in blocks of ``block_size``. For query block ``i``, key block ``j`` (absolute
block positions) and global query head ``h``::

    active(i, j, h) = j <= i and (i - j < local_blocks
                                  or (j + r(h) * step + head_sliding_offset) % vert_stride == 0)

where ``r(h)``, the head's sharding index, depends on ``head_sharding``:

* ``"kv"`` (default): ``r(h) = h // group_size``, the kv head; the query heads of a GQA group share
  their kv head's strided blocks;
* ``"query"``: ``r(h) = h``, every query head its own residue (Phi-3-small's rule, which repeats
  K/V to all query heads; here K/V stay grouped).

``homo_head`` makes ``r(h) = 0`` for every head. The query heads of the last ``num_dense_heads``
kv heads are dense (every causal block). Inside an active block, token-level causality holds.

Every backend consumes the pattern through this one class (``strided_residue`` and
``is_dense_head`` per query head), so the contract lives in one place.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

HEAD_SHARDINGS = ("kv", "query")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class S2Layout:
    """Per-head local + strided block-sparse causal pattern (frozen, hashable: a cache key)."""

    num_heads: int
    """Query heads of the whole (unsharded) attention layer."""
    num_kv_heads: int
    """Key/value heads (GQA groups); ``num_heads`` must be a multiple."""
    block_size: int
    """Tokens per block; a power of two >= 16."""
    local_blocks: int
    """Width of the local window in blocks, the diagonal block included."""
    vert_stride: int
    """Every ``vert_stride``-th older block is attended (per head, with its own residue)."""
    head_sliding_offset: int = 0
    """Added to the strided term; 1 with ``head_sharding="query"`` reproduces Phi-3-small."""
    head_sliding_step: int | None = None
    """Residue shift between consecutive sharding indices r(h); None means the default ``step``."""
    num_dense_heads: int = 0
    """The last ``num_dense_heads`` kv heads, and so all their query heads, attend every causal block."""
    homo_head: bool = False
    """Every head uses the strided residue of r = 0 (no sharding of the context over heads)."""
    head_sharding: str = "kv"
    """What picks a head's strided residue: "kv" (its kv head) or "query" (the query head itself)."""

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "local_blocks", "vert_stride"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        bs = self.block_size
        _require(isinstance(bs, int) and bs >= 16 and bs & (bs - 1) == 0,
                 f"block_size must be a power of two >= 16, got {bs!r}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _require(isinstance(self.num_dense_heads, int) and 0 <= self.num_dense_heads <= self.num_kv_heads,
                 f"num_dense_heads must be in [0, num_kv_heads={self.num_kv_heads}], got {self.num_dense_heads!r}")
        _require(isinstance(self.head_sliding_offset, int),
                 f"head_sliding_offset must be an integer, got {self.head_sliding_offset!r}")
        step = self.head_sliding_step
        _require(step is None or (isinstance(step, int) and step >= 0),
                 f"head_sliding_step must be None or an integer >= 0, got {step!r}")
        _require(self.head_sharding in HEAD_SHARDINGS,
                 f"head_sharding must be one of {HEAD_SHARDINGS}, got {self.head_sharding!r}")
        if not self.covers_all_residues():
            warnings.warn(
                f"S2 heads do not cover every residue of vert_stride={self.vert_stride} "
                f"(head_sharding={self.head_sharding!r}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, step={self.step}, homo_head={self.homo_head}): "
                "some older blocks are seen by no head", stacklevel=3)

    # -- per-head facts ---------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def step(self) -> int:
        """Residue shift between consecutive sharding indices: ``head_sliding_step`` if given, else
        ``max(1, vert_stride // n)`` with n the heads that shard the context (``num_kv_heads`` for
        "kv", ``num_heads`` for "query"), so that the heads spread over all residues.

        The S2 authors' library shards per kv head but defaults its step to
        ``max(1, vert_stride // num_heads)`` (the query-head count) even when K/V are grouped; with
        "kv" sharding, ``head_sliding_step=max(1, vert_stride // num_heads)`` reproduces it.
        """
        if self.head_sliding_step is not None:
            return self.head_sliding_step
        sharding_heads = self.num_heads if self.head_sharding == "query" else self.num_kv_heads
        return max(1, self.vert_stride // sharding_heads)

    def sharding_index(self, h: int) -> int:
        """r(h) of global query head h: its kv head ("kv") or h ("query"); 0 under ``homo_head``."""
        if self.homo_head:
            return 0
        return h if self.head_sharding == "query" else h // self.group_size

    def is_dense_kv_head(self, g: int) -> bool:
        """Kv head g (global) is one of the last ``num_dense_heads``."""
        return g >= self.num_kv_heads - self.num_dense_heads

    def is_dense_head(self, h: int) -> bool:
        """Global query head h attends every causal block (its kv head is dense)."""
        return self.is_dense_kv_head(h // self.group_size)

    def strided_residue(self, h: int) -> int:
        """Key block j is strided-active for global query head h iff j % vert_stride == this."""
        return (-(self.sharding_index(h) * self.step + self.head_sliding_offset)) % self.vert_stride

    def covers_all_residues(self) -> bool:
        """Whether the heads together see every older block: a dense head, stride 1, or the
        query heads' residues span all ``vert_stride`` residues."""
        if self.num_dense_heads > 0 or self.vert_stride == 1:
            return True
        residues = {self.strided_residue(h) for h in range(self.num_heads)}
        return len(residues) == self.vert_stride

    def unseen_block_pairs(self, seq_len: int) -> int:
        """Causal block pairs (i, j) of a ``seq_len``-token sequence that no head attends: a key
        block older than the window (i - j >= local_blocks) whose residue no head has, unless a
        head is dense. 0 means the heads together cover the whole context."""
        if self.num_dense_heads > 0:
            return 0
        n, seen = -(-seq_len // self.block_size), {self.strided_residue(h) for h in range(self.num_heads)}
        return sum(n - self.local_blocks - j for j in range(max(0, n - self.local_blocks))
                   if j % self.vert_stride not in seen)

    # -- masks --------------------------------------------------------------------------------------
    def head_pattern(self, head_offset: int, num_heads: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(long residue [heads], bool dense [heads]) of query heads head_offset .. +num_heads."""
        heads = range(head_offset, head_offset + num_heads)
        return (torch.tensor([self.strided_residue(h) for h in heads], dtype=torch.long, device=device),
                torch.tensor([self.is_dense_head(h) for h in heads], dtype=torch.bool, device=device))

    def block_mask(self, num_q_blocks: int, num_kv_blocks: int, q_block_offset: int = 0,
                   kv_block_offset: int = 0, head_offset: int = 0, num_heads: int | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """bool [heads, num_q_blocks, num_kv_blocks]: active block pairs for query heads
        ``head_offset .. head_offset + num_heads`` (global indices) at the given block offsets."""
        if num_heads is None:
            num_heads = self.num_heads - head_offset
        _require(0 <= head_offset and num_heads >= 1 and head_offset + num_heads <= self.num_heads,
                 f"heads [head_offset={head_offset}, +num_heads={num_heads}) must lie in "
                 f"[0, {self.num_heads})")
        i = torch.arange(num_q_blocks, device=device).view(1, -1, 1) + q_block_offset
        j = torch.arange(num_kv_blocks, device=device).view(1, 1, -1) + kv_block_offset
        residue, dense = self.head_pattern(head_offset, num_heads, device)
        strided = (j % self.vert_stride) == residue.view(-1, 1, 1)
        return (j <= i) & ((i - j < self.local_blocks) | strided | dense.view(-1, 1, 1))

    def density(self, seq_len: int) -> float:
        """Fraction of causal block pairs that are active, averaged over all query heads."""
        n = -(-seq_len // self.block_size)
        active = self.block_mask(n, n).sum().item()
        return active / (self.num_heads * n * (n + 1) / 2)
