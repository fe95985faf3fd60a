"""Process groups for tests, benchmarks and tools that run outside the trainer.

``model_parallel_session`` initialises torch.distributed when nobody has (from torchrun's
environment, or a single-process gloo group with an in-memory store, which needs no port), sets
up Megatron's model-parallel groups, and tears down exactly what it created.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@contextlib.contextmanager
def model_parallel_session(tensor_model_parallel_size: int = 1, context_parallel_size: int = 1, *,
                           timeout_s: float = 120.0):
    """Megatron model-parallel state for the duration of the ``with`` block."""
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size,
                                             context_parallel_size=context_parallel_size)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
