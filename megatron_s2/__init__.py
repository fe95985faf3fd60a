"""megatron-s2: hybrid S2-sparse / dense attention for Megatron-Core (the model side).

    from megatron_s2 import S2AttentionConfig, resolve_hybrid_layout, build_gpt_model
"""
from .attention import DenseCoreAttention, S2CoreAttention
from .config import S2AttentionConfig, resolve_hybrid_layout, validate_hybrid_model
from .flops import FlopsPerToken, training_flops_per_token
from .model import build_gpt_model, get_gpt_s2_layer_specs
from .rope import PortableRotaryEmbedding

__all__ = [
    "S2AttentionConfig", "resolve_hybrid_layout", "validate_hybrid_model",
    "get_gpt_s2_layer_specs", "build_gpt_model",
    "S2CoreAttention", "DenseCoreAttention", "PortableRotaryEmbedding",
    "training_flops_per_token", "FlopsPerToken",
]
