"""s2attn: S2-Attention (arXiv 2407.17678) block-sparse causal attention for PyTorch.

    from s2attn import S2Layout, s2_attention, merge_attention
"""
from .api import s2_attention
from .layout import S2Layout
from .merge import merge_attention

__all__ = ["S2Layout", "s2_attention", "merge_attention"]
