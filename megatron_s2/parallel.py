"""Process groups: the backend choice the trainer and tools share, and a session for tests,
benchmarks and tools that run outside the trainer.

``process_group_backend`` picks NCCL or gloo. ``model_parallel_session`` initialises
torch.distributed when nobody has (from torchrun's environment, or a single-process gloo group
with an in-memory store, which needs no port), sets up Megatron's model-parallel groups, and tears
down exactly what it created.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def process_group_backend(cuda: bool, local_ranks: int, device_count: int) -> str:
    """The torch.distributed backend for ``local_ranks`` processes of one node: "gloo" for CPU
    tensors; for CUDA tensors "nccl" when each local rank has a GPU of its own
    (``device_count >= local_ranks``), else "gloo", since NCCL refuses two ranks on one device
    ("Duplicate GPU detected", ncclInvalidUsage) while gloo lets them share it (its collectives on
    CUDA tensors go through host memory: for tests and debugging, not for speed)."""
    return "nccl" if cuda and device_count >= local_ranks else "gloo"


def local_ranks() -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE, 1 outside torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@contextlib.contextmanager
def model_parallel_session(tensor_model_parallel_size: int = 1, context_parallel_size: int = 1, *,
                           timeout_s: float = 120.0):
    """Megatron model-parallel state for the duration of the ``with`` block."""
    created = not dist.is_initialized()
    if created:
        cuda = torch.cuda.is_available()
        backend = process_group_backend(cuda, local_ranks(), torch.cuda.device_count() if cuda else 0)
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
