"""checkpoint.init_from: a Hugging Face checkpoint folder as the start of a run (Megatron's habit:
weights only, fresh optimizer and schedule, iteration 0).

``check_init_from`` (from ``loop.preflight``, before anything is created) refuses in one line: a
folder that ``megatron_s2.hf.load.check_checkpoint`` refuses (on checkpoint.init_from, naming the
file), a model.* key that differs from what its config.json gives (naming the key and both values),
Mistral's sliding window below train.seq_length. ``load_init_from`` copies the weights into this
rank's model (``megatron_s2.hf.load``).
"""
from __future__ import annotations

import os

from megatron.core import parallel_state

from megatron_s2.hf.config import SOURCE_KEYS, CheckpointError
from megatron_s2.hf.load import check_checkpoint, load_checkpoint

from .config import PretrainConfig
from .errors import ConfigError, show_value
from .metrics import say


def check_init_from(cfg: PretrainConfig) -> None:
    folder = cfg.checkpoint.init_from
    try:
        keys, sliding_window, _ = check_checkpoint(folder)
    except CheckpointError as e:
        raise ConfigError("checkpoint.init_from", folder, str(e)) from e
    config_json = os.path.join(folder, "config.json")
    for key, theirs in keys.model_keys().items():
        if key == "rope_scaling_factor" and not keys.rope_scaling:
            continue
        ours = getattr(cfg.model, key)
        if ours != theirs:
            raise ConfigError(f"model.{key}", ours, f"{config_json} gives {show_value(theirs)} "
                                                    f"({SOURCE_KEYS[key]}; checkpoint.init_from); set "
                                                    f"model.{key}={show_value(theirs)} or write the recipe "
                                                    "with scripts/convert_hf.py recipe")
    if sliding_window is not None and sliding_window < cfg.train.seq_length:
        raise ConfigError("train.seq_length", cfg.train.seq_length,
                          f"{config_json} has sliding_window={sliding_window} (checkpoint.init_from): "
                          f"Mistral's sliding-window attention is not reproduced; use train.seq_length <= "
                          f"{sliding_window}")


def load_init_from(model, cfg: PretrainConfig) -> None:
    """checkpoint.init_from's weights into this rank's model (any tp/pp)."""
    load_checkpoint(model, cfg.checkpoint.init_from, parallel_state.get_tensor_model_parallel_rank(),
                    parallel_state.get_tensor_model_parallel_world_size())
    say(f"initialised from {cfg.checkpoint.init_from} (weights only; fresh optimizer and schedule, iteration 0)")
