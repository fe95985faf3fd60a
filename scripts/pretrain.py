"""Pretrain a hybrid S2/dense GPT model (Hydra app over recipes/).

    python scripts/pretrain.py                          # the embedded default: tiny recipe on CPU
    python scripts/pretrain.py train.iters=50 attention.layout=DSDS
    torchrun --nproc_per_node=8 scripts/pretrain.py --config-name=llama_1p3b_32k run.dir=/ckpt/run1

Every output goes under run.dir (resolved config, metrics.jsonl, checkpoints, wandb files).
"""
import hydra
from omegaconf import DictConfig

from megatron_s2.training import pretrain, register_configs, validate

register_configs()


@hydra.main(config_path="../recipes", config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    pretrain(validate(cfg))


if __name__ == "__main__":
    main()
