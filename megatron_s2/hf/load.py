"""A Hugging Face checkpoint folder into this rank's Megatron GPTModel.

``check_checkpoint(folder)`` does every check that reads only config.json and the safetensors
headers (cheap: no tensor data): the config (``read_hf_config``), the files, and that every tensor
the config implies is there with its shape. ``load_checkpoint(model, folder)`` then copies the
weights into this rank's parameters: each parameter's rule (``mapping.rules``) builds the full
Megatron tensor from the Hugging Face tensors and takes this tensor-parallel rank's slice; under
pipeline parallelism a stage's layers are found by their global ``layer_number``. Every rank reads
the tensors it needs itself (no collective). Values are cast to the parameter's dtype.
"""
from __future__ import annotations

import re

import torch

from .config import CheckpointError, HFModelConfig, read_hf_config
from .files import SafetensorsFolder
from .mapping import hf_shapes, rules

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
"""TransformerEngine's layer spec fuses the norms into the next linear layer."""


def check_checkpoint(folder: str) -> tuple[HFModelConfig, int | None, SafetensorsFolder]:
    """(model keys, Mistral's sliding_window or None, the tensors) after every check that reads no
    tensor data; CheckpointError naming the file and the key or tensor."""
    keys, sliding_window = read_hf_config(folder)
    tensors = SafetensorsFolder(folder)
    for name, shape in hf_shapes(keys).items():
        if name not in tensors.shapes:
            files = sorted(set(tensors.file_of.values()))
            raise CheckpointError(f"{files[0] if len(files) == 1 else folder}: no tensor {name} (its "
                                  f"config.json implies it, shape {list(shape)})")
        if tensors.shapes[name] != shape:
            raise CheckpointError(f"{tensors.file_of[name]}: {name} has shape {list(tensors.shapes[name])}, "
                                  f"config.json implies {list(shape)}")
    return keys, sliding_window, tensors


def global_name(model: torch.nn.Module, name: str) -> str:
    """A parameter's name with its global layer number (a pipeline stage numbers its layers from 0)
    and the local spec's norm names."""
    match = _LAYER.match(name)
    if match is None:
        return name
    rest = _TE_NAMES.get(match[2], match[2])
    return f"decoder.layers.{model.decoder.layers[int(match[1])].layer_number - 1}.{rest}"


@torch.no_grad()
def load_checkpoint(model: torch.nn.Module, folder: str, tp_rank: int = 0, tp_size: int = 1) -> HFModelConfig:
    """Copy ``folder``'s weights into ``model`` (this rank's GPTModel at tensor-parallel ``tp_rank``
    of ``tp_size``); returns the model keys. CheckpointError before anything is copied if the folder
    fails ``check_checkpoint``; ValueError naming the parameter if the model does not fit it."""
    keys, _, tensors = check_checkpoint(folder)
    by_name = {rule.megatron: rule for rule in rules(keys)}
    for name, param in model.named_parameters():
        rule = by_name.get(global_name(model, name))
        if rule is None:
            raise ValueError(f"parameter {name} of the model has no counterpart in {folder}")
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        local = rule.shard(rule.to_megatron(tensors.__getitem__), tp_rank, tp_size, dim)
        if local.shape != param.shape:
            raise ValueError(f"parameter {name} has shape {list(param.shape)}; {folder} gives "
                             f"{list(local.shape)} at tensor-parallel rank {tp_rank} of {tp_size}")
        param.copy_(local)
    return keys
