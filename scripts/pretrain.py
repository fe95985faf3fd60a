"""Pretrain a hybrid S2/dense GPT model (Hydra app over recipes/).

    python scripts/pretrain.py                          # the embedded default: tiny recipe on CPU
    python scripts/pretrain.py train.iters=50 attention.layout=DSDS
    torchrun --nproc_per_node=8 scripts/pretrain.py --config-name=llama_1p3b_32k run.dir=/ckpt/run1

Every output goes under run.dir (resolved config, metrics.jsonl, checkpoints, wandb files).
"""
import warnings

# Megatron-Core announces its pure-PyTorch fallbacks (no TransformerEngine/Apex, e.g. on CPU) at
# import; they are expected here and would bury the first lines of the run.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from megatron_s2.training import pretrain, register_configs, validate  # noqa: E402

register_configs()


@hydra.main(config_path="../recipes", config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    pretrain(validate(cfg))


if __name__ == "__main__":
    main()
