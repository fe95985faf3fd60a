"""The pretraining launcher: Hydra config schemas, data, the training loop, checkpoints, metrics.

    from megatron_s2.training import register_configs, validate, pretrain

The trainer builds on the model side (``megatron_s2``); the model side never imports it. The
command line is ``megatron_s2.training.cli``; refusals are ``errors.ConfigError``.
"""
from .config import PretrainConfig, register_configs, validate
from .errors import ConfigError
from .loop import pretrain

__all__ = ["PretrainConfig", "ConfigError", "register_configs", "validate", "pretrain"]
