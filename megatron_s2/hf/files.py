"""The safetensors of a Hugging Face checkpoint folder: ``model.safetensors``, or the shards that
``model.safetensors.index.json`` lists. Headers are read at once (names, shapes: no tensor data);
each tensor is read when asked for, so a rank holds one full tensor at a time."""
from __future__ import annotations

import json
import os

import torch

from .config import CheckpointError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class SafetensorsFolder:
    """``shapes`` {name: shape} and ``file_of`` {name: path} of every tensor; ``folder[name]`` reads
    one. CheckpointError naming the file: no safetensors, a shard the index lists that is missing,
    a file that is not safetensors."""

    def __init__(self, folder: str) -> None:
        from safetensors import SafetensorError, safe_open

        index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})") from e
            missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
            if missing:
                raise CheckpointError(f"{os.path.join(folder, missing[0])}: missing ({INDEX} lists it)")
        elif os.path.isfile(single):
            files = [SINGLE]
        else:
            raise CheckpointError(f"{single}: missing, and no {INDEX} (the weights must be safetensors)")
        self.shapes, self.file_of, self._handles = {}, {}, {}
        for name in files:
            path = os.path.join(folder, name)
            try:
                handle = self._handles[path] = safe_open(path, framework="pt")
                for key in handle.keys():
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())
                    self.file_of[key] = path
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self.file_of[name]].get_tensor(name)
