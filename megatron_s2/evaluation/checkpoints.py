"""Rebuild a trained model from its run directory: the resolved config.yaml that the trainer wrote
and the newest complete checkpoint, model weights only (no optimizer), in one process (tp=cp=pp=1).

Limits: pp > 1 runs are refused. Runs trained with tp or cp > 1 are loaded into one process
through Megatron's resharding dist checkpoints (the trainer tests that for tp=2; this module's
test covers a single-process run only).
"""
from __future__ import annotations

import contextlib
import os

import torch
from omegaconf import OmegaConf

from megatron_s2 import build_gpt_model
from megatron_s2.parallel import model_parallel_session
from megatron_s2.training import checkpoint as ckpt
from megatron_s2.training.config import Device, PretrainConfig, Precision, validate
from megatron_s2.training.data import load_tokenizer
from megatron_s2.training.loop import padded_vocab_size, transformer_config


def load_run_config(run_dir: str) -> PretrainConfig:
    """The run's config, validated for one CPU process (data paths are not needed to evaluate)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"run_dir {run_dir!r} has no config.yaml (is it a run directory?)")
    cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig), OmegaConf.load(path))
    if cfg.parallel.pp != 1:
        raise ValueError(f"run {run_dir!r} was trained with parallel.pp={cfg.parallel.pp}; evaluation "
                         "loads pp=1 runs only")
    cfg.data.prefixes, cfg.data.valid_prefixes, cfg.data.weights = [], [], None
    cfg.parallel.tp = cfg.parallel.cp = 1
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
        model = build_gpt_model(transformer_config(cfg), cfg.attention.s2, cfg.attention.layout,
                                vocab_size=vocab_size, max_sequence_length=cfg.train.seq_length,
                                rotary_base=cfg.model.rotary_base,
                                share_embeddings_and_output_weights=cfg.model.share_embeddings_and_output_weights)
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
