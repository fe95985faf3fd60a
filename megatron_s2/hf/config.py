"""A Hugging Face checkpoint folder's config.json as our model keys, and the config of an export.

``read_hf_config(folder)`` reads config.json (transformers 5's ``rope_parameters`` or the older
``rope_theta``/``rope_scaling``) of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or our
own export (S2LlamaForCausalLM) into ``HFModelConfig``: the ``model.*`` keys of a recipe, by
Megatron's names. What our model would compute differently is refused, never ignored, with a
``CheckpointError`` naming the file and the key: another activation, biases other than Qwen2's
q/k/v, a head_dim other than hidden_size / num_attention_heads, partial rotary, RoPE scaling other
than Llama 3's (Megatron's ``rope_scaling`` fixes low/high frequency factors 1 and 4 over 8192
original positions), Qwen2's sliding window. Mistral's ``sliding_window`` is kept for the trainer,
which refuses it below ``train.seq_length`` (below that length it changes nothing).

``export_config`` is the inverse: a Llama config (Qwen2's when the model has q/k/v biases) for a
dense layout; for a layout with S layers our ``S2LlamaConfig``, a Llama config with an ``s2``
section (the layout and the S2 pattern) and ``qkv_bias``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "S2LlamaForCausalLM")
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The Llama-3 RoPE scaling constants Megatron's RotaryEmbedding._apply_scaling fixes."""


class CheckpointError(ValueError):
    """A folder or run that cannot be converted; str() names the file and the key or tensor."""


@dataclass(frozen=True)
class HFModelConfig:
    """What a checkpoint determines, as our model.* keys (Megatron's names)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    rotary_base: int
    rope_scaling: bool
    rope_scaling_factor: float
    layernorm_epsilon: float
    share_embeddings_and_output_weights: bool
    add_qkv_bias: bool
    swiglu: bool = True

    def model_keys(self) -> dict:
        return dataclasses.asdict(self)


SOURCE_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
               "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
               "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size",
               "rotary_base": "rope_theta", "rope_scaling": "rope_type llama3",
               "rope_scaling_factor": "rope factor", "layernorm_epsilon": "rms_norm_eps",
               "share_embeddings_and_output_weights": "tie_word_embeddings",
               "add_qkv_bias": "q/k/v biases", "swiglu": "hidden_act silu"}
"""Our key -> what in config.json gives it (named in refusals)."""


def _refuse(path: str, text: str):
    raise CheckpointError(f"{path}: {text}")


def _rope(config: dict, path: str) -> tuple[int, bool, float]:
    """(rotary_base, rope_scaling, rope_scaling_factor) of either config.json layout."""
    rope = config.get("rope_parameters")
    if rope is None:            # transformers 4: rope_theta and rope_scaling at the top level
        rope = dict(config.get("rope_scaling") or {}, rope_theta=config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or theta != int(theta) or theta <= 0:
        _refuse(path, f"rope_theta={theta!r} is not a positive whole number (model.rotary_base is an integer)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(path, f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (RoPE on every channel)")
    if kind == "default":
        return int(theta), False, 8.0
    if kind != "llama3":
        _refuse(path, f"rope_type={kind!r} is not supported; supported: default, llama3")
    for key, value in LLAMA3_ROPE.items():
        if rope.get(key) != value:
            _refuse(path, f"rope_type llama3 with {key}={rope.get(key)!r} is not supported (Megatron's RoPE "
                          f"scaling fixes {key}={value})")
    return int(theta), True, float(rope["factor"])


def read_hf_config(folder: str) -> tuple[HFModelConfig, int | None]:
    """(the model keys, Mistral's sliding_window or None) of ``folder``/config.json; CheckpointError
    naming the file and key for anything we do not reproduce."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        _refuse(path, "does not exist (a Hugging Face checkpoint folder holds config.json, *.safetensors "
                      "and its tokenizer)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        _refuse(path, f"is not readable JSON ({e})")
    architectures = config.get("architectures") or []
    arch = architectures[0] if len(architectures) == 1 else None
    if arch not in ARCHITECTURES:
        _refuse(path, f"architectures={architectures} is not supported; supported: {', '.join(ARCHITECTURES)}")
    if config.get("hidden_act", "silu") != "silu":
        _refuse(path, f"hidden_act={config['hidden_act']!r} is not supported (SwiGLU: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            _refuse(path, f"{key}=true is not supported (q/k/v biases: Qwen2ForCausalLM)")
    if arch == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
        _refuse(path, "use_sliding_window=true is not supported (full causal attention)")
    def need(key):
        if not isinstance(config.get(key), int) or config[key] < 1:
            _refuse(path, f"{key}={config.get(key)!r}: a positive integer is needed")
        return config[key]

    heads, hidden = need("num_attention_heads"), need("hidden_size")
    if config.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        _refuse(path, f"head_dim={config.get('head_dim')} is not hidden_size / num_attention_heads "
                      f"({hidden} / {heads}); not supported")
    rotary_base, rope_scaling, factor = _rope(config, path)
    keys = HFModelConfig(
        num_layers=need("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        ffn_hidden_size=need("intermediate_size"), vocab_size=need("vocab_size"),
        rotary_base=rotary_base, rope_scaling=rope_scaling, rope_scaling_factor=factor,
        layernorm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
        add_qkv_bias=arch == "Qwen2ForCausalLM" or bool(config.get("qkv_bias", False)))
    sliding_window = config.get("sliding_window") if arch == "MistralForCausalLM" else None
    return keys, sliding_window


def rope_parameters(keys: HFModelConfig) -> dict:
    """transformers 5's rope_parameters for our RoPE keys."""
    rope = {"rope_type": "default", "rope_theta": float(keys.rotary_base)}
    if keys.rope_scaling:
        rope.update(rope_type="llama3", factor=keys.rope_scaling_factor, **LLAMA3_ROPE)
    return rope


def export_config(keys: HFModelConfig, *, layout: str, pattern: dict, max_position_embeddings: int,
                  eos_token_id: int, bos_token_id: int | None, dtype: str):
    """The transformers config of an export (saved with ``save_pretrained``): LlamaConfig, or
    Qwen2Config for q/k/v biases, when ``layout`` has no S layer; else S2LlamaConfig with
    ``s2 = {"layout": layout, **pattern}`` and auto_map to the folder's modeling_s2.py."""
    common = dict(hidden_size=keys.hidden_size, intermediate_size=keys.ffn_hidden_size,
                  num_hidden_layers=keys.num_layers, num_attention_heads=keys.num_attention_heads,
                  num_key_value_heads=keys.num_query_groups, vocab_size=keys.vocab_size,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=keys.layernorm_epsilon,
                  tie_word_embeddings=keys.share_embeddings_and_output_weights,
                  rope_parameters=rope_parameters(keys), hidden_act="silu", bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id, pad_token_id=eos_token_id, dtype=dtype)
    if "S" not in layout:
        if keys.add_qkv_bias:
            from transformers import Qwen2Config
            return Qwen2Config(use_sliding_window=False, architectures=["Qwen2ForCausalLM"], **common)
        from transformers import LlamaConfig
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common)
    from .modeling_s2 import S2LlamaConfig
    config = S2LlamaConfig(architectures=["S2LlamaForCausalLM"], s2={"layout": layout, **pattern},
                           qkv_bias=keys.add_qkv_bias, **common)
    config.auto_map = {"AutoConfig": "modeling_s2.S2LlamaConfig",
                       "AutoModelForCausalLM": "modeling_s2.S2LlamaForCausalLM"}
    return config
