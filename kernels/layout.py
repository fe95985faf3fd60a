"""The S2 block-sparse pattern: which key blocks each query block of each head attends to.

Tokens are grouped in blocks of ``block_size``. For query block ``i`` and key block ``j`` (absolute
block positions) and kv head ``g`` (global index; query head ``h`` uses ``g = h // group``)::

    active(i, j, g) = j <= i and (i - j < local_blocks
                                  or (j + g * step + head_sliding_offset) % vert_stride == 0)

The last ``num_dense_heads`` kv heads are dense (every causal block); ``homo_head`` uses ``g = 0``
in the strided term for every head. Inside an active block, token-level causality holds.

Every backend consumes the pattern through this one class, so the contract lives in one place.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


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
    """Added to the strided term; 1 reproduces Phi-3-small's layout."""
    head_sliding_step: int | None = None
    """Residue shift between consecutive kv heads; None means max(1, vert_stride // num_kv_heads)."""
    num_dense_heads: int = 0
    """The last ``num_dense_heads`` kv heads attend every causal block."""
    homo_head: bool = False
    """Every head uses the strided residue of kv head 0 (no sharding of the context over heads)."""

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
        if not self.covers_all_residues():
            warnings.warn(
                f"S2 heads do not cover every residue of vert_stride={self.vert_stride} "
                f"(num_kv_heads={self.num_kv_heads}, step={self.step}, homo_head={self.homo_head}): "
                "some older blocks are seen by no head", stacklevel=3)

    # -- per-head facts ---------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def step(self) -> int:
        if self.head_sliding_step is not None:
            return self.head_sliding_step
        return max(1, self.vert_stride // self.num_kv_heads)

    def is_dense_kv_head(self, g: int) -> bool:
        return g >= self.num_kv_heads - self.num_dense_heads

    def strided_residue(self, g: int) -> int:
        """Key block j is strided-active for kv head g iff j % vert_stride == this residue."""
        g_eff = 0 if self.homo_head else g
        return (-(g_eff * self.step + self.head_sliding_offset)) % self.vert_stride

    def covers_all_residues(self) -> bool:
        if self.num_dense_heads > 0 or self.vert_stride == 1:
            return True
        residues = {self.strided_residue(g) for g in range(self.num_kv_heads)}
        return len(residues) == self.vert_stride

    # -- masks --------------------------------------------------------------------------------------
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
        g = (torch.arange(num_heads, device=device) + head_offset) // self.group_size
        residue = torch.tensor([self.strided_residue(int(x)) for x in g], device=device).view(-1, 1, 1)
        dense = torch.tensor([self.is_dense_kv_head(int(x)) for x in g], device=device).view(-1, 1, 1)
        strided = (j % self.vert_stride) == residue
        return (j <= i) & ((i - j < self.local_blocks) | strided | dense)

    def density(self, seq_len: int) -> float:
        """Fraction of causal block pairs that are active, averaged over all heads."""
        n = -(-seq_len // self.block_size)
        active = self.block_mask(n, n).sum().item()
        return active / (self.num_heads * n * (n + 1) / 2)
