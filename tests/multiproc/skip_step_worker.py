"""Worker: a CPU training run (``pretrain``) that records this rank's parameters before every step,
so a test can see what every rank did, not only rank 0's log.

    torchrun --standalone --nproc_per_node=N tests/multiproc/skip_step_worker.py OUT_PREFIX key=value ...

Writes OUT_PREFIX.rank<R>.pt: a list, one entry per step, of {parameter name: tensor} as the step
found them. Observation only: the recorded step runs unchanged.
"""
import os
import sys

import torch

from megatron_s2.training import pretrain, validate
from megatron_s2.training.config import compose_config
from megatron_s2.training.engine import CpuEngine

out_prefix, overrides = sys.argv[1], sys.argv[2:]
before_each_step = []
forward_backward = CpuEngine.forward_backward


def recording_forward_backward(self, micro_batches):
    before_each_step.append({name: p.detach().clone() for name, p in self.module.named_parameters()})
    return forward_backward(self, micro_batches)


CpuEngine.forward_backward = recording_forward_backward
pretrain(validate(compose_config(overrides)))
torch.save(before_each_step, f"{out_prefix}.rank{os.environ['RANK']}.pt")
