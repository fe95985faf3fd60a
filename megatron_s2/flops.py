"""Training FLOPs per token of a hybrid S2/dense GPT model.

Counts matrix-multiply FLOPs (2 per multiply-add) of one token's forward pass:

* per layer: QKV projection (GQA: H query heads, G kv heads of head_dim d), attention output
  projection, MLP (two matrices, three when gated, e.g. SwiGLU);
* attention scores and values: 4 * d * H FLOPs per attended key. Attention is counted at block
  granularity, as the kernels compute it: a D layer computes every causal block pair, an S layer
  only its active pairs (the layout's density over all query heads, whichever ``head_sharding``
  gives them their residues). Diagonal blocks count in full;
* the output logits (2 * hidden * vocab).

Packed documents (``document_lengths``): attention is counted per document, each as its own
sequence of ceil(length / block_size) blocks (its partial last block in full, as the kernels pad
it), so only within-document blocks count; linear layers and logits still count every token.

Training = 3 x forward (the backward pass costs twice the forward). Norms, softmax, RoPE and
embedding lookups are left out. ``dense_equivalent`` is the same model with every layer dense:
the number that a dense-attention MFU would use, reported next to the sparse count, labelled
(with the same documents: dense attention within each document).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

from .config import DENSE, S2AttentionConfig, check_layout


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token (forward + backward)."""

    sparse: float
    """Counting only the attention blocks the layout computes (per-layer density)."""
    dense_equivalent: float
    """The same model with every layer dense (causal): what dense attention would cost."""

    @property
    def predicted_speedup(self) -> float:
        """dense_equivalent / sparse: the step-time ratio the FLOPs model predicts."""
        return self.dense_equivalent / self.sparse


@functools.lru_cache(maxsize=256)
def _density(layout, length: int) -> float:
    """``layout.density(length)``, kept: packs repeat lengths, and a plan tries the same geometry
    under several settings (at 128k tokens one call builds a 2048 x 2048 mask per head)."""
    return layout.density(length)


def training_flops_per_token(config: TransformerConfig, layout: str, s2: S2AttentionConfig,
                             seq_length: int, vocab_size: int,
                             document_lengths: Sequence[int] | None = None) -> FlopsPerToken:
    """Training FLOPs per token of ``seq_length``-token sequences (a multiple of s2.block_size).

    ``document_lengths`` (tokens, summing to ``seq_length``; zeros allowed): the documents packed
    into each sequence, attended separately; None means one document of ``seq_length``. Bad input
    raises ValueError naming it.
    """
    check_layout(layout, config.num_layers)
    if seq_length % s2.block_size:
        raise ValueError(f"seq_length ({seq_length}) must be a multiple of s2.block_size ({s2.block_size})")
    documents = (seq_length,) if document_lengths is None else tuple(document_lengths)
    if not all(isinstance(n, int) and n >= 0 for n in documents) or sum(documents) != seq_length:
        raise ValueError(f"document_lengths must be non-negative integers summing to seq_length ({seq_length}), "
                         f"got {document_lengths!r}")
    h, heads, d = config.hidden_size, config.num_attention_heads, config.kv_channels
    groups = config.num_query_groups or heads
    mlp_matrices = 3 if config.gated_linear_unit else 2
    linear = (2 * h * (heads + 2 * groups) * d      # QKV
              + 2 * heads * d * h                   # output projection
              + 2 * mlp_matrices * h * config.ffn_hidden_size)

    bs, s2_layout = s2.block_size, s2.to_layout(heads, groups)
    dense_pairs = sparse_pairs = 0.0            # block pairs per query head, over the documents
    for length in documents:
        n = -(-length // bs)
        if n:
            dense_pairs += n * (n + 1) / 2      # every causal block pair
            sparse_pairs += n * (n + 1) / 2 * _density(s2_layout, length)
    dense_attention = 4 * d * heads * dense_pairs * bs * bs / seq_length
    sparse_attention = 4 * d * heads * sparse_pairs * bs * bs / seq_length

    logits = 2 * h * vocab_size
    num_dense = layout.count(DENSE)
    num_sparse = len(layout) - num_dense
    forward_sparse = len(layout) * linear + num_dense * dense_attention + num_sparse * sparse_attention + logits
    forward_dense = len(layout) * (linear + dense_attention) + logits
    return FlopsPerToken(sparse=3 * forward_sparse, dense_equivalent=3 * forward_dense)
