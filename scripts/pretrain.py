"""Pretrain a hybrid S2/dense GPT model (recipes/ with Hydra's override syntax).

    python scripts/pretrain.py                          # the embedded default: tiny recipe on CPU
    python scripts/pretrain.py --help                   # recipes and stable keys
    torchrun --nproc_per_node=2 scripts/pretrain.py run.dir=runs/tiny_dp2   # the same recipe, data parallel
    torchrun --nproc_per_node=8 scripts/pretrain.py --config-name=llama_1p3b_32k run.dir=/ckpt/run1

Every output goes under run.dir (resolved config, metrics.jsonl, checkpoints, wandb files). A
refused config prints one line and exits with status 2 (megatron_s2/training/cli.py).
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads: see docs/BENCHMARKS.md, "A shared CPU"

from megatron_s2 import sigterm_deferral

sigterm_deferral.defer()        # a refused config exits 2 even if torchrun's SIGTERM comes first

from megatron_s2.accelerators import quiet_fallback_notices  # noqa: E402

quiet_fallback_notices()        # before Megatron is imported; the run states its accelerators once

from megatron_s2.training.cli import main  # noqa: E402

if __name__ == "__main__":
    status = main()
    if status == 2:             # refused: torchrun's SIGTERM (another rank refused first) keeps it 2
        sigterm_deferral.ignore()
    sys.exit(status)
