"""Parameter mappings between Megatron-Core's GPTModel and Hugging Face's Llama family, one small
class per rule (Megatron-Bridge's idea; our own code):

- ``Copied``: one tensor is one tensor (embeddings, output layer, norms, attention output, fc2).
- ``FusedQKV``: Megatron's ``linear_qkv`` holds, per query group g, the rows [q heads of group g;
  k_g; v_g] (``SelfAttention.get_query_key_value_tensors`` splits them in that order); Hugging Face
  keeps q_proj, k_proj, v_proj apart. The same rule maps the weights [rows, hidden] and the Qwen2
  biases [rows].
- ``GatedFC1``: Megatron's SwiGLU ``linear_fc1`` is [gate; up] (``MLP``: ``chunk(2)``, silu on the
  first half); Hugging Face has gate_proj and up_proj.

RoPE needs no mapping: Megatron's default (non-interleaved halves) is Hugging Face Llama's
rotate-half. Every rule also gives this tensor-parallel rank's slice of a full tensor (``shard``):
a contiguous chunk along the parameter's partition dim (whole query groups for the fused QKV, so
its rows stay grouped), and for the SwiGLU fc1 the rank's chunk of gate and of up, concatenated.
Names are Megatron's local layer spec with global layer numbers (0-based).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HFModelConfig


@dataclass(frozen=True)
class Copied:
    """Megatron tensor ``megatron`` is Hugging Face tensor ``hf`` of ``shape``."""

    megatron: str
    hf: str
    shape: tuple

    @property
    def hf_shapes(self) -> dict[str, tuple]:
        return {self.hf: self.shape}

    def to_megatron(self, read) -> torch.Tensor:
        return read(self.hf)

    def to_hf(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.hf: tensor}

    def shard(self, full: torch.Tensor, rank: int, size: int, dim: int | None) -> torch.Tensor:
        """This rank's slice along ``dim`` (None: not tensor parallel)."""
        return full if dim is None else full.chunk(size, dim)[rank]


@dataclass(frozen=True)
class FusedQKV(Copied):
    """``linear_qkv.{weight,bias}`` <-> ``{q,k,v}_proj.{weight,bias}`` (``hf`` is the prefix
    ``model.layers.i.self_attn.``, ``shape`` the trailing dims: (hidden,) or ())."""

    suffix: str = "weight"
    heads: int = 1
    groups: int = 1
    head_dim: int = 1

    def _names(self) -> tuple[str, str, str]:
        return tuple(f"{self.hf}{p}_proj.{self.suffix}" for p in "qkv")

    @property
    def hf_shapes(self) -> dict[str, tuple]:
        q, k, v = self._names()
        kv = (self.groups * self.head_dim, *self.shape)
        return {q: (self.heads * self.head_dim, *self.shape), k: kv, v: kv}

    def to_megatron(self, read) -> torch.Tensor:
        q, k, v = (read(name) for name in self._names())
        per_group = [t.reshape(self.groups, -1, *self.shape) for t in (q, k, v)]
        return torch.cat(per_group, dim=1).reshape(-1, *self.shape)

    def to_hf(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        q_rows = self.heads // self.groups * self.head_dim
        grouped = tensor.reshape(self.groups, q_rows + 2 * self.head_dim, *self.shape)
        parts = grouped.split([q_rows, self.head_dim, self.head_dim], dim=1)
        return {name: part.reshape(-1, *self.shape) for name, part in zip(self._names(), parts)}


@dataclass(frozen=True)
class GatedFC1(Copied):
    """``linear_fc1.weight`` [2*ffn, hidden] = [gate_proj; up_proj] (``hf`` is gate_proj's name,
    ``up`` up_proj's, ``shape`` one of them)."""

    up: str = ""

    @property
    def hf_shapes(self) -> dict[str, tuple]:
        return {self.hf: self.shape, self.up: self.shape}

    def to_megatron(self, read) -> torch.Tensor:
        return torch.cat((read(self.hf), read(self.up)))

    def to_hf(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        gate, up = tensor.chunk(2)
        return {self.hf: gate, self.up: up}

    def shard(self, full: torch.Tensor, rank: int, size: int, dim: int | None) -> torch.Tensor:
        if dim is None:
            return full
        return torch.cat([half.chunk(size, dim)[rank] for half in full.chunk(2)], dim)


def rules(c: HFModelConfig) -> list[Copied]:
    """Every rule of a model with these keys, for the whole model (all layers, both ends). With tied
    embeddings the output layer reads the embedding (a pipeline's last stage holds a copy)."""
    h, f, v, d = c.hidden_size, c.ffn_hidden_size, c.vocab_size, c.hidden_size // c.num_attention_heads
    heads = dict(heads=c.num_attention_heads, groups=c.num_query_groups, head_dim=d)
    found = [Copied("embedding.word_embeddings.weight", "model.embed_tokens.weight", (v, h)),
             Copied("decoder.final_layernorm.weight", "model.norm.weight", (h,)),
             Copied("output_layer.weight", "model.embed_tokens.weight" if c.share_embeddings_and_output_weights
                    else "lm_head.weight", (v, h))]
    for i in range(c.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        found += [Copied(ours + "input_layernorm.weight", theirs + "input_layernorm.weight", (h,)),
                  FusedQKV(ours + "self_attention.linear_qkv.weight", theirs + "self_attn.", (h,), **heads)]
        if c.add_qkv_bias:
            found.append(FusedQKV(ours + "self_attention.linear_qkv.bias", theirs + "self_attn.", (),
                                  suffix="bias", **heads))
        found += [Copied(ours + "self_attention.linear_proj.weight", theirs + "self_attn.o_proj.weight",
                         (h, c.num_attention_heads * d)),
                  Copied(ours + "pre_mlp_layernorm.weight", theirs + "post_attention_layernorm.weight", (h,)),
                  GatedFC1(ours + "mlp.linear_fc1.weight", theirs + "mlp.gate_proj.weight", (f, h),
                           up=theirs + "mlp.up_proj.weight"),
                  Copied(ours + "mlp.linear_fc2.weight", theirs + "mlp.down_proj.weight", (h, f))]
    return found


def hf_shapes(c: HFModelConfig) -> dict[str, tuple]:
    """Every Hugging Face tensor a checkpoint with these keys holds, and its shape."""
    return {name: shape for rule in rules(c) for name, shape in rule.hf_shapes.items()}
