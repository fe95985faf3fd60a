"""The layer norm of the local (non-TransformerEngine) layer specs: RMSNorm or LayerNorm that works
under sequence parallelism.

Megatron's local spec builds ``torch.nn.RMSNorm``/``LayerNorm`` through ``WrappedTorchNorm``, which
refuses ``config.sequence_parallel``; its sequence-parallel norms (TE's, apex's) mark their weights
``sequence_parallel = True`` so that ``megatron.core.distributed.finalize_model_grads`` sums their
gradients over the tensor-parallel group (each TP rank saw only its slice of the sequence). This
module does the same in plain torch, so a GPU without TransformerEngine can train the
sequence-parallel recipes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

NORMALIZATIONS = ("RMSNorm", "LayerNorm")


class Norm(torch.nn.Module):
    """``config.normalization`` over the last dimension: RMSNorm ``x / sqrt(mean(x^2) + eps) * w``
    (Zhang & Sennrich 2019) or LayerNorm ``(x - mean) / sqrt(var + eps) * w + b`` (Ba et al. 2016).

    Built like Megatron's norms, ``Norm(config, hidden_size, eps)``. Parameters: ``weight`` [hidden]
    (ones) and, for LayerNorm, ``bias`` [hidden] (zeros), in ``config.params_dtype``, on the CPU
    with ``config.use_cpu_initialization`` and on the current CUDA device otherwise; each carries
    ``sequence_parallel = config.sequence_parallel`` (the attribute finalize_model_grads reads).
    Input [..., hidden] of any float dtype; output the same shape and dtype (torch's kernels
    accumulate reduced precision in fp32). ValueError for another ``config.normalization`` or
    ``config.layernorm_zero_centered_gamma``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"config.normalization must be one of {NORMALIZATIONS} without "
                             f"TransformerEngine, got {config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("config.layernorm_zero_centered_gamma=True needs TransformerEngine's norm")
        self.rms = config.normalization == "RMSNorm"
        self.shape, self.eps = (hidden_size,), eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        make = dict(device=device, dtype=config.params_dtype)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, **make))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, **make))
        for param in (self.weight, self.bias):
            if param is not None:
                param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
