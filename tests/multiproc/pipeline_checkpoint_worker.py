"""torchrun worker (2 ranks): a run checkpoint saved at pipeline-parallel size 2, on CPU.

    torchrun --standalone --nproc_per_node=2 pipeline_checkpoint_worker.py DONE.json RECIPES_DIR RUN_DIR

The trainer's CPU path refuses pp > 1 (Megatron's pipeline schedules need CUDA), but a model cut
into two stages builds and saves on CPU. Each rank composes the recipe ``from_source`` that
tests/test_hf_export.py wrote, builds its stage (layers 0-1 or 2-3) as the trainer does with
parallel.pp=2, initialises it from the recipe's checkpoint.init_from (the stage's layers found by
their global number) and saves it with the trainer's checkpoint writer; rank 0 writes the run's
config.yaml as the trainer does. The export must reshard it into one process.
"""
import json
import os
import sys
import warnings

import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from megatron_s2.training import checkpoint as ckpt
from megatron_s2.training.config import compose_config, to_plain_dict, validate
from megatron_s2.training.init_from import load_init_from
from megatron_s2.training.loop import build_model, run_meta, transformer_config

warnings.filterwarnings("ignore")


def main(out_path: str, recipes_dir: str, run_dir: str) -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, pipeline_model_parallel_size=2)
    cfg = validate(compose_config([f"run.dir={run_dir}"], recipe="from_source", recipes_dir=recipes_dir), world_size=1)
    cfg.parallel.pp = 2                 # after validate, which keeps pp > 1 to the cuda path
    stage = parallel_state.get_pipeline_model_parallel_rank()
    model = build_model(cfg, transformer_config(cfg), cfg.model.vocab_size, pre_process=stage == 0,
                        post_process=stage == 1)
    load_init_from(model, cfg)
    if dist.get_rank() == 0:
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_plain_dict(cfg), f, sort_keys=False)
    path = ckpt.save_checkpoint(cfg.checkpoint_dir, 1, {"model": model.sharded_state_dict()},
                                run_meta(cfg, 2, cfg.model.vocab_size), keep_last=1)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"checkpoint": path, "stage_layers": [layer.layer_number for layer in model.decoder.layers]}, f)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
