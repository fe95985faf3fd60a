"""``pretrain`` of the config that OVERRIDES compose, with torch's deterministic algorithms: an op
without a deterministic implementation raises instead of running (``torch.use_deterministic_algorithms``;
on CUDA, cuBLAS gets the fixed workspace that it needs for that, ``CUBLAS_WORKSPACE_CONFIG``, set
before CUDA starts).

    python deterministic_pretrain.py OVERRIDE...
"""
import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from megatron_s2.training import pretrain, validate  # noqa: E402
from megatron_s2.training.config import compose_config  # noqa: E402

if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    pretrain(validate(compose_config(sys.argv[1:]), world_size=1))
