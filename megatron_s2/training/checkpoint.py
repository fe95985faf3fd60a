"""Atomic Megatron-Core dist_checkpointing saves, resume from the newest complete one, RNG state.

A checkpoint is ``<checkpoint_dir>/iter_0000123/``: the sharded state (model, optimizer) and the
common state (scheduler, data position) in Megatron's torch_dist format, one RNG state per rank
(a ShardedObject), and ``run.json`` (iteration, layout, S2 config, model shape, parallel sizes).
All ranks write into ``tmp_iter_0000123/``; rank 0 renames it when every rank is done. A save
killed half way leaves only a ``tmp_`` directory, which resume ignores and the next save deletes.

The torch_dist writer that Megatron ships forks writer processes and starts a multiprocessing
manager; ``SyncTorchDistSaveStrategy`` writes the same format from the calling thread instead
(Megatron's own key translation and planner, torch's FileSystemWriter), on CPU and GPU alike.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import threading
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)

from .errors import ConfigError, show_value

_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
META_FILE = "run.json"


class SyncTorchDistSaveStrategy(SaveShardedStrategy):
    """Megatron's torch_dist format, written synchronously by the calling thread."""

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True)
        dcp.save(mcore_to_pyt_state_dict(sharded_state_dict, is_loading=False),
                 storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))


def iter_dir(checkpoint_dir: str, iteration: int) -> str:
    return os.path.join(checkpoint_dir, f"iter_{iteration:07d}")


def complete_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(iteration, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = _ITER_DIR.match(name)
        path = os.path.join(checkpoint_dir, name)
        if match and os.path.isfile(os.path.join(path, META_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    found = complete_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def check_compatible(saved: dict, current: dict, path: str, defaults: dict | None = None) -> None:
    """Refuse to resume a run whose layout, S2 config or model shape differs from the checkpoint:
    a ConfigError on the first key that differs (attention.layout, attention.s2.*, model.*).
    ``defaults`` ({"model": {name: value}}) stands in for keys an older checkpoint did not record."""
    defaults = defaults or {}
    for key, what in (("layout", "attention.layout"), ("s2", "attention.s2"), ("model", "model")):
        pairs = ([(f"{what}.{name}", saved[key].get(name, defaults.get(key, {}).get(name)), value)
                  for name, value in current[key].items()]
                 if isinstance(current[key], dict) else [(what, saved[key], current[key])])
        for name, was, now in pairs:
            if was != now:
                raise ConfigError(name, now, f"{path} was saved with {name}={show_value(was)}; a different "
                                             "model needs its own run.dir (or checkpoint.dir)")


@contextlib.contextmanager
def ctrl_c_deferred():
    """Ctrl-C (SIGINT) inside the block takes effect when it ends: torch.distributed.checkpoint
    catches BaseException on every rank, so an interrupt in the middle of a save would surface as a
    failed save, or not at all. Only the main thread can set signal handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)          # to the previous handler: KeyboardInterrupt


def save_checkpoint(checkpoint_dir: str, iteration: int, sharded_state_dict: dict, meta: dict,
                    keep_last: int) -> str:
    """Save atomically on every rank (collective); keep the newest ``keep_last``. Returns the path.
    A Ctrl-C during the save lets it finish, then interrupts (``ctrl_c_deferred``)."""
    with ctrl_c_deferred():
        return _save_checkpoint(checkpoint_dir, iteration, sharded_state_dict, meta, keep_last)


def _save_checkpoint(checkpoint_dir: str, iteration: int, sharded_state_dict: dict, meta: dict,
                     keep_last: int) -> str:
    final = iter_dir(checkpoint_dir, iteration)
    tmp = os.path.join(checkpoint_dir, "tmp_" + os.path.basename(final))
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        for name in os.listdir(checkpoint_dir):
            if name.startswith("tmp_iter_"):
                shutil.rmtree(os.path.join(checkpoint_dir, name))
        os.makedirs(tmp)
    dist.barrier()
    try:
        with _quiet_torch_notices():
            dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy=SyncTorchDistSaveStrategy())
        if rank == 0:
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump({**meta, "iteration": iteration}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
    except (Exception, dcp.CheckpointException) as e:     # the latter is a BaseException
        # Disk full, quota, a vanished mount: the complete checkpoints are untouched (old ones are
        # deleted only after a save succeeds), the partial tmp_ directory is ignored by resume.
        raise CheckpointSaveError(
            f"saving the checkpoint of iteration {iteration} into {tmp} failed: {_root_cause(e)}; "
            f"the newest complete checkpoint, {latest_checkpoint(checkpoint_dir)}, is kept") from e
    if rank == 0:
        if os.path.isdir(final):        # saved before at this iteration (a resumed run's end)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


class CheckpointSaveError(RuntimeError):
    """A save failed; the previous complete checkpoints are intact."""


def _root_cause(error: BaseException) -> str:
    """The OSError under torch.distributed.checkpoint's per-rank wrapping, when there is one."""
    seen = [error]
    while seen[-1].__cause__ is not None or seen[-1].__context__ is not None:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    for failure in (getattr(error, "failures", None) or {}).values():     # rank -> (exception, traceback)
        seen.append(failure[0] if isinstance(failure, tuple) else failure)
    for e in seen:
        if isinstance(e, OSError):
            return f"{type(e).__name__}: {e}"
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def _quiet_torch_notices():
    """Hide (by message) the deprecation notices of torch that Megatron's dist_checkpointing
    triggers at every save and load: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
        yield


def load_checkpoint(path: str, sharded_state_dict: dict) -> dict:
    """Load into the given template (collective); returns the filled state dict."""
    with _quiet_torch_notices():
        return dist_checkpointing.load(sharded_state_dict, path)


# -- RNG state, one per rank ---------------------------------------------------------------------

def rng_sharded_object(world_size: int, rank: int, state: dict | None = None) -> ShardedObject:
    """This rank's RNG state as a ShardedObject (a template when ``state`` is None)."""
    return ShardedObject("rng_state", state, (world_size,), (rank,), replica_id=0)


def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
