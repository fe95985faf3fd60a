"""GPU worker: a few optimizer steps of a tiny hybrid model through the trainer's engines on fixed
random batches; writes each engine's per-step losses and gradient norms.

    python gpu_engine_worker.py OUT.json ENGINES - PRECISION MASKED            (one process)
    torchrun --standalone --nproc_per_node=2 gpu_engine_worker.py OUT.json gpu PARALLEL fp32 0

ENGINES: "gpu", "cpu" or "cpu,gpu" (each builds its own model from the same seed, so both start
from the same weights). PARALLEL: comma-separated config overrides ("parallel.cp=2",
"parallel.tp=2,parallel.sequence_parallel=true") or "-". Process groups come from the trainer's
``init_distributed``: local rank r on GPU r modulo the GPUs there are, NCCL, or gloo when ranks
share a GPU.
Weights are drawn on the CPU and sliced (use_cpu_initialization), so any tp starts from the
single-process weights. Data parallel size = world size / (tp x cp). The global batch (8
sequences of 128 tokens; MASKED=1 drops about a third of the tokens from the loss) is cut into
micro batches of one sequence: data-parallel rank r takes micro batches r, r + dp, ... (the
trainer's order), each cut for context parallelism in Megatron's order. No learning-rate schedule
and no weight decay, so the two engines' optimizers see the same settings.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_s2 import build_gpt_model
from megatron_s2.context_parallel import split_batch_for_cp
from megatron_s2.training import validate
from megatron_s2.training.config import compose_config
from megatron_s2.training.data import micro_batch_start
from megatron_s2.training.engine import CpuEngine, GpuEngine
from megatron_s2.training.loop import init_distributed, seed_everything, transformer_config

SEQ, GLOBAL_BATCH, VOCAB, STEPS = 128, 8, 256, 4
OVERRIDES = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
             "model.num_query_groups=2", "model.ffn_hidden_size=128", "attention.layout=SD",
             "attention.s2.block_size=16", "attention.s2.local_blocks=2", "attention.s2.vert_stride=2",
             f"train.seq_length={SEQ}", "train.micro_batch_size=1", f"train.global_batch_size={GLOBAL_BATCH}",
             "train.weight_decay=0.0", "train.device=cuda", "parallel.distributed_timeout_minutes=1"]


def global_batch(step: int, masked: bool) -> list[dict]:
    """The step's sequences as micro batches of one (tokens, labels, loss_mask, position_ids)."""
    generator = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=generator) > 0.3 if masked
            else torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.bool))
    return [{"tokens": tokens[i:i + 1, :-1], "labels": tokens[i:i + 1, 1:], "loss_mask": mask[i:i + 1].float(),
             "position_ids": torch.arange(SEQ).unsqueeze(0)} for i in range(GLOBAL_BATCH)]


def train(cfg, engine_name: str, masked: bool) -> dict:
    seed_everything(cfg.train.seed, cuda=True)
    config = transformer_config(cfg)
    config.use_cpu_initialization = True
    model = build_gpt_model(config, cfg.attention.s2, cfg.attention.layout, vocab_size=VOCAB,
                            max_sequence_length=SEQ).cuda()
    engine = CpuEngine(model, cfg) if engine_name == "cpu" else GpuEngine(model, cfg, config)
    for group in engine.optimizer.param_groups:
        group["lr"] = cfg.train.lr
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    cp_size, cp_rank = cfg.parallel.cp, parallel_state.get_context_parallel_rank()
    losses, grad_norms = [], []
    for step in range(STEPS):
        sequences = global_batch(step, masked)
        mine = [sequences[micro_batch_start(0, k, dp_rank, dp_size, 1)] for k in range(GLOBAL_BATCH // dp_size)]
        batches = [split_batch_for_cp({k: v.cuda() for k, v in b.items()}, cp_size, cp_rank) for b in mine]
        losses.append(engine.forward_backward(batches))
        grad_norms.append(engine.grad_norm())
        engine.step(grad_norms[-1])
    return {"loss": losses, "grad_norm": grad_norms}


def main(out_path: str, engines: str, parallel: str, precision: str, masked: bool) -> None:
    overrides = [] if parallel == "-" else parallel.split(",")
    cfg = validate(compose_config(OVERRIDES + overrides + [f"train.precision={precision}"]),
                   world_size=int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed(cfg)
    results = {name: train(cfg, name, masked) for name in engines.split(",")}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"backend": dist.get_backend(), **results}, f, indent=1)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1")
