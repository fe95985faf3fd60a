"""What each transformer layer keeps for its backward pass, counted as autograd saves it.

``count_saved_bytes(model)`` is a context manager: during the forward passes run inside it, every
tensor that autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``) is counted
once per storage, in bytes of the whole storage (a saved view keeps all of it alive), and charged
to the decoder layer whose forward is running (``model.decoder.layers``), or to ``other``
(embedding, final norm, output layer, loss). Parameters are not counted. A storage saved again
later (a layer's output saved by the next layer's norm) stays with its first saver. Tensors that
a module keeps by other means (a closure, a Python attribute) are not seen.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class SavedBytes:
    """Bytes saved for backward, per decoder layer (in the order of ``model.decoder.layers``)."""

    layers: list[int]
    other: int = 0
    shapes: list[list[tuple]] = field(default_factory=list)
    """Per layer: (shape, dtype, storage bytes) of each storage counted, in the order saved."""


@contextlib.contextmanager
def count_saved_bytes(model: torch.nn.Module):
    """Yields a ``SavedBytes`` filled in by the forward passes run inside the block."""
    layers = list(model.decoder.layers)
    result = SavedBytes(layers=[0] * len(layers), shapes=[[] for _ in layers])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, keep = set(), []          # keep: saved storages stay referenced, so no address is reused
    current = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen and storage.nbytes():
            seen.add(ptr)
            keep.append(t)
            if current[0] is None:
                result.other += storage.nbytes()
            else:
                result.layers[current[0]] += storage.nbytes()
                result.shapes[current[0]].append((tuple(t.shape), t.dtype, storage.nbytes()))
        return t

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda module, args, i=i: current.__setitem__(0, i)))
        handles.append(layer.register_forward_hook(lambda module, args, out: current.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        for handle in handles:
            handle.remove()


def measure_forward(config, s2, layout: str, *, seq_length: int, micro_batch_size: int, vocab_size: int,
                    recompute_impl: str = "torch", seed: int = 0) -> SavedBytes:
    """Build ``build_gpt_model(config, s2, layout, ...)`` (seeded, in training mode, on the CPU
    when ``config.use_cpu_initialization`` else on CUDA) and count what one forward over random
    tokens [micro_batch_size, seq_length] saves. Needs Megatron's model-parallel state."""
    from .model import build_gpt_model

    torch.manual_seed(seed)
    model = build_gpt_model(config, s2, layout, vocab_size=vocab_size, max_sequence_length=seq_length,
                            recompute_impl=recompute_impl)
    device = next(model.parameters()).device
    model.train()
    tokens = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), device=device)
    positions = torch.arange(seq_length, device=device).expand(micro_batch_size, seq_length)
    with count_saved_bytes(model) as saved:
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
    return saved
