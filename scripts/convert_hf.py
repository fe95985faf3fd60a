"""Hugging Face checkpoints in and out (megatron_s2/hf/cli.py).

    python scripts/convert_hf.py recipe /models/llama --layout DSSS --out myrecipes/llama_dsss.yaml
    python scripts/pretrain.py --config-path myrecipes --config-name llama_dsss
    python scripts/convert_hf.py export runs/llama_dsss /models/llama_dsss

A refusal prints one line and exits with status 2, writing nothing.
"""
import sys

from megatron_s2.accelerators import quiet_fallback_notices

quiet_fallback_notices()        # before Megatron is imported

from megatron_s2.hf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
