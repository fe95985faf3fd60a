"""megatron-s2: hybrid S2-sparse / dense attention for Megatron-Core (the model side).

    from megatron_s2 import S2AttentionConfig, resolve_hybrid_layout, build_gpt_model
"""
import importlib

# Exports load on first use (PEP 562), so that the parts that need only torch (config,
# context_parallel, plots) import without megatron-core, e.g. on a GPU machine as shipped.
_EXPORTS = {
    "DenseCoreAttention": "attention", "S2CoreAttention": "attention",
    "S2AttentionConfig": "config", "resolve_hybrid_layout": "config", "validate_hybrid_model": "config",
    "FlopsPerToken": "flops", "training_flops_per_token": "flops",
    "build_gpt_model": "model", "get_gpt_s2_layer_specs": "model",
    "PortableRotaryEmbedding": "rope",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = list(_EXPORTS)
