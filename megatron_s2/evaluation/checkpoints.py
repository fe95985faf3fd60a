"""Rebuild a trained model from its run directory: the resolved config.yaml that the trainer wrote
and the newest complete checkpoint, model weights only (no optimizer), in one process (tp=cp=pp=1).

Runs saved at any tp/pp/cp are loaded into one process through Megatron's resharding dist
checkpoints (tests/test_hf_export.py exports checkpoints saved at tp=2 and at pp=2).
"""
from __future__ import annotations

import contextlib
import os

import torch
from omegaconf import OmegaConf

from megatron_s2.parallel import model_parallel_session
from megatron_s2.training import checkpoint as ckpt
from megatron_s2.training.config import Device, PretrainConfig, Precision, validate
from megatron_s2.training.data import load_tokenizer
from megatron_s2.training.loop import build_model, padded_vocab_size, transformer_config


def load_run_config(run_dir: str) -> PretrainConfig:
    """The run's config, validated for one CPU process (data paths are not needed to evaluate)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"run_dir {run_dir!r} has no config.yaml (is it a run directory?)")
    cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig), OmegaConf.load(path))
    cfg.data.prefixes, cfg.data.valid_prefixes, cfg.data.weights = [], [], None
    cfg.checkpoint.init_from = None         # the weights come from the run's own checkpoint
    cfg.parallel.tp = cfg.parallel.cp = cfg.parallel.pp = 1
    cfg.parallel.sequence_parallel = False
    cfg.train.device, cfg.train.precision = Device.cpu.value, Precision.fp32.value
    cfg.run.dir = run_dir
    return validate(cfg, world_size=1)


@contextlib.contextmanager
def trained_model(run_dir: str):
    """Yields (model in eval mode, config, checkpoint path) inside a single-process model-parallel
    session; the session is torn down on exit."""
    cfg = load_run_config(run_dir)
    path = ckpt.latest_checkpoint(cfg.checkpoint_dir)
    if path is None:
        raise ValueError(f"run_dir {run_dir!r}: no complete checkpoint under {cfg.checkpoint_dir}")
    with model_parallel_session(1):
        torch.manual_seed(cfg.train.seed)
        vocab_size = padded_vocab_size(load_tokenizer(cfg.data.tokenizer).vocab_size, cfg)
        model = build_model(cfg, transformer_config(cfg), vocab_size)
        state = ckpt.load_checkpoint(path, {"model": model.sharded_state_dict()})
        model.load_state_dict(state["model"])
        model.eval()
        yield model, cfg, path


def logits_function(model):
    """tokens [b, s] -> logits [b, s, vocab] of a Megatron GPTModel (positions 0..s-1)."""
    def logits(tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return model(tokens, positions, None).float()
    return logits
