"""A run directory as a Hugging Face checkpoint folder.

``export_run(run_dir, out_dir)`` loads the run's newest complete checkpoint into one process
(``megatron_s2.evaluation.checkpoints.trained_model``: Megatron's dist_checkpointing reshards a
checkpoint saved at any tp/pp/cp), maps every tensor to Hugging Face's names (``mapping.rules``) and
writes, into a temporary folder renamed to ``out_dir`` when complete:

- ``model.safetensors`` (``dtype``, float32 by default);
- ``config.json`` (``config.export_config``): a Llama config (Qwen2's for q/k/v biases) when the
  layout is all dense, else ``S2LlamaConfig`` with the ``s2`` section and ``auto_map``;
- the tokenizer (the run's data.tokenizer; the byte tokenizer as ``tokenizer.byte_tokenizer``);
- for a layout with S layers, ``modeling_s2.py`` (this package's, verbatim) and ``s2_layout.py``
  (s2attn's ``layout.py``, which it imports when s2attn is not installed).

CheckpointError (nothing written) for an ``out_dir`` that exists, a run without a checkpoint or a
model that is not a Llama (no SwiGLU).
"""
from __future__ import annotations

import os
import shutil

import torch

from .config import CheckpointError, HFModelConfig, export_config
from .mapping import hf_shapes, rules
from .tokenizer import save_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_keys(cfg, vocab_size: int) -> HFModelConfig:
    """The model keys of a validated run config (PretrainConfig); ``vocab_size``: its embedding rows."""
    m = cfg.model
    if not m.swiglu:
        raise CheckpointError("model.swiglu=false: a Llama export needs the SwiGLU MLP")
    return HFModelConfig(num_layers=m.num_layers, hidden_size=m.hidden_size,
                         num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                         ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,     # Megatron's default
                         vocab_size=vocab_size, rotary_base=m.rotary_base, rope_scaling=m.rope_scaling,
                         rope_scaling_factor=m.rope_scaling_factor, layernorm_epsilon=m.layernorm_epsilon,
                         share_embeddings_and_output_weights=m.share_embeddings_and_output_weights,
                         add_qkv_bias=m.add_qkv_bias)


def hf_state_dict(state: dict[str, torch.Tensor], keys: HFModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors from a whole (tp=pp=1) GPTModel state dict; ValueError if a tensor is
    left over or missing."""
    state = {name: t for name, t in state.items() if not name.endswith("_extra_state")}
    tensors = {}
    for rule in rules(keys):
        if rule.megatron in state:       # absent: the output layer of tied embeddings
            tensors.update(rule.to_hf(state.pop(rule.megatron)))
    missing = set(hf_shapes(keys)) - set(tensors)
    if state or missing:
        raise ValueError(f"the model's tensors {sorted(state)} have no rule; {sorted(missing)} were not made")
    return tensors


def export_run(run_dir: str, out_dir: str, dtype: str = "float32") -> str:
    """Write ``run_dir``'s newest checkpoint as a Hugging Face folder ``out_dir``; returns its path."""
    from megatron_s2.evaluation.checkpoints import trained_model
    from safetensors.torch import save_file

    from . import modeling_s2

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise CheckpointError(f"{out_dir}: exists; export into a new folder")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{out_dir}: {parent} is not a writable directory")
    try:
        with trained_model(run_dir) as (model, cfg, _):
            state = model.state_dict()
    except CheckpointError:
        raise
    except ValueError as e:             # no config.yaml, no checkpoint, a refused run config
        raise CheckpointError(f"{run_dir}: {e}") from e
    keys = run_keys(cfg, state["embedding.word_embeddings.weight"].shape[0])
    tensors = {name: t.to(DTYPES[dtype]).clone() for name, t in hf_state_dict(state, keys).items()}
    layout, s2 = cfg.attention.layout, cfg.attention.s2
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer = save_tokenizer(cfg.data.tokenizer, tmp)
        config = export_config(keys, layout=layout, pattern={k: getattr(s2, k) for k in modeling_s2.PATTERN_KEYS},
                               max_position_embeddings=cfg.train.seq_length,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                               dtype=dtype)
        config.save_pretrained(tmp)
        if "S" in layout:
            import s2attn.layout
            shutil.copyfile(modeling_s2.__file__, os.path.join(tmp, "modeling_s2.py"))
            shutil.copyfile(s2attn.layout.__file__, os.path.join(tmp, "s2_layout.py"))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
