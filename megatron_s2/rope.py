"""A rotary position embedding that works on any device (Megatron's moves itself to CUDA).

``PortableRotaryEmbedding`` is Megatron-Core's ``RotaryEmbedding`` with ``inv_freq`` held as a
non-persistent buffer on a device of our choosing (so ``model.to(...)`` moves it), no hop to
``torch.cuda.current_device()``, and context-parallel slicing without pinned memory. It computes
the same embedding: [seq, 1, 1, rotary_dim] angles, consumed by Megatron's ``apply_rotary_pos_emb``.
No lru_cache on ``forward``: a cached tensor would stay on its old device after a move, and the
angles cost one [seq, dim/2] outer product per step.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from .context_parallel import context_parallel_positions


class PortableRotaryEmbedding(RotaryEmbedding):
    """Megatron's RotaryEmbedding (same constructor arguments except ``use_cpu_initialization``),
    built on ``device``."""

    def __init__(self, *args, device: torch.device | str = "cpu", **kwargs):
        super().__init__(*args, use_cpu_initialization=True, **kwargs)
        inv_freq = self.inv_freq
        del self.inv_freq   # a plain attribute in the parent: re-register it as a buffer
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)            # [seq, dim/2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None) -> torch.Tensor:
        emb = self.get_emb(max_seq_len, offset)
        cp_group = self.cp_group if cp_group is None else cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            emb = emb[context_parallel_positions(max_seq_len, cp_group.size(), cp_group.rank(), emb.device)]
        return emb
