"""torchrun worker: our all-dense model initialised from Hugging Face folders at tensor parallel size
WORLD_SIZE, against the Hugging Face model itself.

    torchrun --standalone --nproc_per_node=2 hf_import_worker.py OUT.json RECIPES_DIR HF_DIR ...

Each rank composes the recipe that ``tests/hf_models.recipe_config`` wrote for the folder (tp =
world size), builds and initialises its shard as the trainer does, and computes its vocabulary
slice of the logits; the slices are all-gathered, and rank 0 writes, per folder, the largest
difference relative to the largest of Hugging Face's fp32 logits.
"""
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_models import max_relative_error, our_logits  # noqa: E402

from megatron_s2.parallel import model_parallel_session  # noqa: E402
from megatron_s2.training.config import compose_config, validate  # noqa: E402

warnings.filterwarnings("ignore")


def main(out_path: str, recipes_dir: str, *folders: str) -> None:
    from transformers import AutoModelForCausalLM

    world = int(os.environ["WORLD_SIZE"])
    tokens = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(3))
    errors = {}
    with model_parallel_session(world):
        for folder in folders:
            name = "from_" + os.path.basename(folder)
            cfg = validate(compose_config([f"parallel.tp={world}"], recipe=name, recipes_dir=recipes_dir),
                           world_size=world)
            local = our_logits(cfg, tokens)
            slices = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(slices, local.contiguous())
            ours = torch.cat(slices, dim=-1)
            if dist.get_rank() == 0:
                hf = AutoModelForCausalLM.from_pretrained(folder).eval()
                with torch.no_grad():
                    errors[os.path.basename(folder)] = max_relative_error(ours, hf(tokens).logits)
        if dist.get_rank() == 0:
            with open(out_path, "w") as f:
                json.dump(errors, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
