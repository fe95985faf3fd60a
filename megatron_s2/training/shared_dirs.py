"""Several nodes must share one filesystem for run.dir, checkpoint.dir and data.cache_dir.

Every rank writes its own checkpoint shards into checkpoint.dir and rank 0 completes the save
there; Megatron builds the dataset index caches in data.cache_dir on rank 0 only and the other
ranks read them. A node that sees another folder (a node-local disk, or a relative run.dir
resolved from another working directory) would train into a checkpoint that misses shards, fail
on a missing index file, or resume from another iteration than its peers.

``check_shared_dirs`` finds out before the first step: rank 0 writes a marker file into each of
these directories, every rank looks for it in the directory it resolved, and a rank that does not
see it refuses the run on every rank (ConfigError, one line naming the key); rank 0 then removes
the marker and any directory it created for it. ``agreed_checkpoint`` makes every rank resume from
the same iteration or refuses. Both are collectives, called on every rank after the process group
exists; with one process they check nothing.
"""
from __future__ import annotations

import os
import secrets
import socket

import torch.distributed as dist

from . import checkpoint as ckpt
from .config import PretrainConfig
from .errors import ConfigError

SHARED = "must be on a filesystem that every node shares, at the same path"


def _directories(cfg: PretrainConfig) -> list[tuple[str, str]]:
    """(key, directory) of every directory all ranks must share."""
    dirs = [("run.dir", cfg.run.dir), ("data.cache_dir", cfg.data.cache_dir)]
    return dirs + ([("checkpoint.dir", cfg.checkpoint.dir)] if cfg.checkpoint.dir else [])


def _makedirs(path: str) -> list[str]:
    """Create ``path`` with its missing parents; returns those created, deepest first."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.makedirs(directory, exist_ok=True)
    return missing


def _all_gather(value) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_shared_dirs(cfg: PretrainConfig) -> None:
    """Refuse (ConfigError on every rank) when some rank does not see, in the directory it resolved
    for a key of ``_directories``, the marker rank 0 wrote into its own (module docstring)."""
    if dist.get_world_size() == 1:
        return
    rank, dirs = dist.get_rank(), _directories(cfg)
    marker, created = [None], []
    if rank == 0:
        marker[0] = f".megatron_s2_shared_{secrets.token_hex(8)}"
        for _, directory in dirs:
            created += _makedirs(directory)
            open(os.path.join(directory, marker[0]), "w").close()
    dist.broadcast_object_list(marker, src=0)
    seen = [os.path.isfile(os.path.join(directory, marker[0])) for _, directory in dirs]
    ranks = _all_gather((socket.gethostname(), [d for _, d in dirs], seen))     # every rank has looked
    if rank == 0:
        for _, directory in dirs:
            os.remove(os.path.join(directory, marker[0]))
    for k, (key, _) in enumerate(dirs):
        blind = [r for r, (_, _, saw) in enumerate(ranks) if not saw[k]]
        if blind:
            if rank == 0:
                for directory in created:
                    os.rmdir(directory)
            host0, dirs0, _ = ranks[0]
            host, theirs, _ = ranks[blind[0]]
            raise ConfigError(key, dirs0[k], f"{len(blind)} of {len(ranks)} ranks (e.g. rank {blind[0]} on {host}, "
                              f"which resolves it to {theirs[k]}) do not see the file rank 0 (on {host0}) wrote "
                              f"there; {key} {SHARED}")


def agreed_checkpoint(cfg: PretrainConfig) -> str | None:
    """The checkpoint every rank resumes from (None: a fresh start), found by each rank in its own
    checkpoint directory and compared by iteration; ConfigError on every rank when they differ."""
    path = ckpt.latest_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint.resume else None
    found = _all_gather((socket.gethostname(), os.path.basename(path) if path else None))
    if all(name == found[0][1] for _, name in found):
        return path
    odd = next(r for r, (_, name) in enumerate(found) if name != found[0][1])
    key = "checkpoint.dir" if cfg.checkpoint.dir else "run.dir"
    raise ConfigError(key, cfg.checkpoint.dir or cfg.run.dir,
                      f"ranks would resume from different checkpoints: rank 0 (on {found[0][0]}) from "
                      f"{found[0][1] or 'none (a fresh start)'}, rank {odd} (on {found[odd][0]}) from "
                      f"{found[odd][1] or 'none (a fresh start)'}; {key} {SHARED}")
