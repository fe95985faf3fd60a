"""Stopping a run before train.iters on purpose: finish the step, save, exit 0.

Checked after every step, agreed on by all ranks (one MAX all-reduce), so that they all stop
after the same step:

- SIGTERM or SIGUSR1 received by a worker since the first step. SIGTERM is what torchrun forwards
  when it is itself terminated; it then waits only its shutdown grace (``--shutdown-timeout``,
  30 s by default) before it SIGKILLs the workers, so a step and a save longer than that are lost.
  torchrun does not handle SIGUSR1: sent to the workers themselves, with torchrun ignoring it (as
  ``scripts/slurm_pretrain.sh`` arranges), it stops the run however long a step and a save take.
- ``train.exit_duration_in_mins`` (Megatron's --exit-duration-in-mins): the first step that ends
  more than this many minutes after the launch started.
- ``train.exit_interval`` (Megatron's --exit-interval): an iteration that is a multiple of it.

Before the first step the signals keep their default action: nothing is saved yet.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from .config import PretrainConfig

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopConditions:
    """Install the signal handlers (main thread only); ``after_step`` says whether to stop."""

    def __init__(self, cfg: PretrainConfig, launched: float) -> None:
        """``launched``: time.time() when the launch started (train.exit_duration_in_mins)."""
        self.cfg, self.launched = cfg, launched
        self.received = 0       # the number of the last stop signal received, 0 for none
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def after_step(self, iteration: int, device: torch.device) -> str | None:
        """Why the run stops after ``iteration`` (the same on every rank; a collective), or None:
        ``SIGTERM``, ``SIGUSR1``, ``train.exit_duration_in_mins=M`` or ``train.exit_interval=N``."""
        t = self.cfg.train
        late = t.exit_duration_in_mins is not None and time.time() - self.launched > 60 * t.exit_duration_in_mins
        flags = torch.tensor([float(self.received), float(late)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        received, late = int(flags[0].item()), bool(flags[1].item())
        if received:
            return signal.Signals(received).name
        if late:
            return f"train.exit_duration_in_mins={t.exit_duration_in_mins}"
        if t.exit_interval and iteration % t.exit_interval == 0:
            return f"train.exit_interval={t.exit_interval}"
        return None

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
