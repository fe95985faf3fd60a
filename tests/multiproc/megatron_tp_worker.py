"""torchrun worker: a hybrid GPTModel at TP=2 against the same model at TP=1 (same seed).

Run with ``torchrun --standalone --nproc_per_node=2 megatron_tp_worker.py OUT.json``. For every
case each rank builds the TP=2 model, runs forward + backward, all-gathers the TP shards of every
gradient; then both ranks build the TP=1 model (CPU initialisation draws the full weight from the
same seed and splits it, so the weights are equal) and do the same. Rank 0 writes, per case, the
relative loss difference and the largest gradient difference relative to the gradient's scale.
"""
import datetime
import json
import sys
import warnings

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_s2 import S2AttentionConfig, build_gpt_model
from megatron_s2.parallel import model_parallel_session

warnings.filterwarnings("ignore")

SEQ, VOCAB, BATCH = 128, 96, 2
CASES = {
    # name: (num_attention_heads, num_query_groups, S2 config, layout)
    "mha": (4, 4, S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4), "SDS"),
    "gqa": (8, 4, S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4), "SSD"),
    "dense_heads": (4, 2, S2AttentionConfig(block_size=16, local_blocks=1, vert_stride=8,
                                            num_dense_heads=1), "DSS"),
}


def run(tp: int, heads: int, groups: int, s2: S2AttentionConfig, layout: str):
    """(loss, {name: full gradient}) of one forward + backward at TP size ``tp``."""
    with model_parallel_session(tp):
        config = TransformerConfig(num_layers=len(layout), hidden_size=64, num_attention_heads=heads,
                                   num_query_groups=groups, ffn_hidden_size=128,
                                   tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                   hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=True)
        torch.manual_seed(1234)
        model = build_gpt_model(config, s2, layout, vocab_size=VOCAB, max_sequence_length=SEQ)
        generator = torch.Generator().manual_seed(5)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
        position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
        loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        group = parallel_state.get_tensor_model_parallel_group()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                shards = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(shards, g.contiguous(), group=group)
                g = torch.cat(shards, dim=p.partition_dim)
            grads[name] = g
        return loss.item(), grads


def main(out_path: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results = {}
    for name, case in CASES.items():
        loss2, grads2 = run(2, *case)
        loss1, grads1 = run(1, *case)
        assert grads1.keys() == grads2.keys(), (sorted(grads1), sorted(grads2))
        grad_err = max((grads2[k] - grads1[k]).abs().max().item() / max(grads1[k].abs().max().item(), 1e-12)
                       for k in grads1)
        results[name] = {"loss_tp1": loss1, "loss_tp2": loss2,
                         "loss_rel_diff": abs(loss2 - loss1) / abs(loss1),
                         "max_grad_rel_diff": grad_err, "num_params": len(grads1)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
