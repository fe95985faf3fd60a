"""Activation recomputation with Megatron's knobs, in torch code of ours (works on CPU too).

Megatron-Core recomputes through ``tensor_parallel.checkpoint``, which saves and restores the CUDA
RNG unconditionally, so its recomputation needs CUDA. ``build_gpt_model(...,
recompute_impl="torch")`` applies the same ``TransformerConfig`` knobs through the layer specs
instead: the recomputed modules become subclasses of their own class (``recomputed``) whose forward
runs under ``torch.utils.checkpoint`` in its reentrant form, the form of Megatron's own
``CheckpointFunction``: the inputs are saved, the forward runs without keeping activations, the
backward replays it with the RNG state of the forward (CPU, and CUDA for CUDA inputs, restored by
``preserve_rng_state``), so dropout draws the same masks.

What each knob does here, as in Megatron-Core 0.16:

- ``recompute_granularity="full"`` with ``recompute_method="block"``: the first
  ``recompute_num_layers`` layers of this pipeline stage are each recomputed as a whole (Megatron
  checkpoints them one by one too); ``"uniform"`` with ``recompute_num_layers=1``: every layer.
  Megatron's ``uniform`` with more layers checkpoints a chunk of consecutive layers as one unit,
  which a layer-wise wrapper cannot express: refused here (ValueError), use block or the CUDA path.
- ``recompute_granularity="selective"`` with ``recompute_modules=["core_attn"]`` (Megatron's
  default): the core attention is recomputed, its inputs q, k, v are kept. ``"mlp"`` is refused
  here (Megatron's layer recognises its MLP by class and would build a subclass with a warning
  per layer), and so is ``"layernorm"`` (Megatron discards the norm's output and rebuilds it
  before its consumer's backward, which a wrapper cannot).

The model's own config then carries no recomputation (``without_recompute``), so Megatron's block
does not checkpoint a second time.
"""
from __future__ import annotations

import copy
import functools

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

IMPLEMENTATIONS = ("megatron", "torch")
TORCH_MODULES = ("core_attn",)
"""The selective ``recompute_modules`` that ``recompute_impl="torch"`` implements."""


@functools.cache
def recomputed(module_cls: type, inputs: int = 1) -> type:
    """A subclass of ``module_cls`` whose forward, while training with grad enabled, runs under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=True, preserve_rng_state=True)``. The first
    ``inputs`` arguments (positional, or by the name Megatron passes them under) are the
    checkpoint's tensor inputs, the only ones that may require grad; other arguments (masks,
    rotary embeddings, packed_seq_params) reach the replayed forward unchanged."""
    names = {1: ("hidden_states",), 3: ("query", "key", "value")}[inputs]

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return module_cls.forward(self, *args, **kwargs)
        args = list(args)
        tensors = [kwargs.pop(name) if name in kwargs else args.pop(0) for name in names]
        return torch.utils.checkpoint.checkpoint(
            lambda *t: module_cls.forward(self, *t, *args, **kwargs), *tensors,
            use_reentrant=True, preserve_rng_state=True)

    return type(f"Recomputed{module_cls.__name__}", (module_cls,), {
        "forward": forward, "__doc__": f"{module_cls.__name__}, recomputed in the backward pass "
                                       "(megatron_s2.recompute.recomputed)."})


def check_torch_recompute(config: TransformerConfig, num_local_layers: int) -> None:
    """ValueError, naming the knob, for what ``recompute_impl="torch"`` cannot do (Megatron's own
    checks of the knobs ran when ``config`` was built)."""
    granularity, method, n = config.recompute_granularity, config.recompute_method, config.recompute_num_layers
    if granularity == "full" and method == "uniform" and n != 1:
        raise ValueError(f"recompute_num_layers ({n}) must be 1 with recompute_method 'uniform' in the torch "
                         "recomputation (layer by layer); use recompute_method 'block' or the cuda path")
    if granularity == "full" and not 1 <= n <= num_local_layers:
        raise ValueError(f"recompute_num_layers ({n}) must be between 1 and the layers of this pipeline "
                         f"stage ({num_local_layers})")
    if granularity == "selective":
        bad = sorted(set(config.recompute_modules) - set(TORCH_MODULES))
        if bad:
            raise ValueError(f"recompute_modules ({config.recompute_modules}) may hold only {list(TORCH_MODULES)} "
                             f"in the torch recomputation, got {bad}; Megatron's own (cuda) does the others")


def _recomputed_core_attention(target):
    """A layer spec's core attention (a class, or a partial of one such as S2CoreAttention with s2
    bound; Megatron calls it directly) made recomputed."""
    if isinstance(target, functools.partial):
        return functools.partial(recomputed(target.func, 3), *target.args, **target.keywords)
    return recomputed(target, 3)


def apply_torch_recompute(config: TransformerConfig, layer_specs: list[ModuleSpec]) -> list[ModuleSpec]:
    """Copies of this stage's layer specs (in order) with ``config``'s recomputation applied by
    ``recomputed`` classes; ValueError as ``check_torch_recompute``."""
    check_torch_recompute(config, len(layer_specs))
    granularity = config.recompute_granularity
    out = []
    for i, spec in enumerate(layer_specs):
        spec = copy.deepcopy(spec)
        if granularity == "full" and (config.recompute_method == "uniform" or i < config.recompute_num_layers):
            spec.module = recomputed(spec.module)
        elif granularity == "selective":
            attention = spec.submodules.self_attention.submodules
            attention.core_attention = _recomputed_core_attention(attention.core_attention)
        out.append(spec)
    return out


def without_recompute(config: TransformerConfig) -> TransformerConfig:
    """A shallow copy of ``config`` with no recomputation (its other fields shared as they are)."""
    plain = copy.copy(config)
    plain.recompute_granularity = plain.recompute_method = plain.recompute_num_layers = None
    return plain
