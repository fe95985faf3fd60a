"""torchrun worker: a hybrid GPTModel split by tensor and context parallelism against the same
model unsplit (same seed).

    torchrun --standalone --nproc_per_node=TP*CP megatron_parallel_worker.py OUT.json TP CP

For every case each rank builds the (TP, CP) model, runs forward + backward on its share of the
tokens (Megatron's CP order), sums gradients over the CP group and all-gathers the TP shards; then
builds the unsplit model (CPU initialisation draws the full weights from the same seed and splits
them, so the weights are equal) and does the same. Rank 0 writes, per case, the largest relative
per-token loss difference and the largest gradient difference relative to the gradient's scale.
With TP > 1 the GQA model is also built under sequence parallelism (build only: Megatron's
sequence-parallel collectives allocate on CUDA): which parameters are marked ``sequence_parallel``.
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
from megatron_s2.context_parallel import split_batch_for_cp
from megatron_s2.parallel import model_parallel_session

warnings.filterwarnings("ignore")

SEQ, VOCAB, BATCH = 128, 96, 2
CASES = {
    # name: (num_attention_heads, num_query_groups, S2 config, layout)
    "mha": (4, 4, S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4), "SDS"),
    "gqa": (8, 4, S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4), "SSD"),
    "dense_heads": (4, 2, S2AttentionConfig(block_size=16, local_blocks=1, vert_stride=8,
                                            num_dense_heads=1), "DSS"),
    "all_gather_exchange": (4, 2, S2AttentionConfig(block_size=16, local_blocks=1, vert_stride=2,
                                                    cp_exchange="all_gather"), "SS"),
    "dense": (4, 2, S2AttentionConfig(block_size=16), "DD"),
}


def build(tp: int, cp: int, heads: int, groups: int, s2: S2AttentionConfig, layout: str, **kw):
    config = TransformerConfig(num_layers=len(layout), hidden_size=64, num_attention_heads=heads,
                               num_query_groups=groups, ffn_hidden_size=128,
                               tensor_model_parallel_size=tp, context_parallel_size=cp,
                               use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                               add_bias_linear=True, **kw)
    torch.manual_seed(1234)
    return build_gpt_model(config, s2, layout, vocab_size=VOCAB, max_sequence_length=SEQ)


def sequence_parallel_marks(tp: int, cp: int) -> dict:
    """Names of the norm parameters and of the parameters marked ``sequence_parallel``."""
    with model_parallel_session(tp, cp):
        model = build(tp, cp, *CASES["gqa"], sequence_parallel=True)
        return {"norm_params": sorted(n for n, _ in model.named_parameters() if "layernorm" in n),
                "marked": sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))}


def run(tp: int, cp: int, heads: int, groups: int, s2: S2AttentionConfig, layout: str):
    """(per-token loss of this rank's tokens, {name: full gradient}) at (tp, cp)."""
    with model_parallel_session(tp, cp):
        model = build(tp, cp, heads, groups, s2, layout)
        generator = torch.Generator().manual_seed(5)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}
        cp_rank = parallel_state.get_context_parallel_rank()
        local = split_batch_for_cp(batch, cp, cp_rank)
        per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"])
        (per_token.sum() / (BATCH * SEQ)).backward()            # the global mean, summed over CP
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.clone()
            if cp > 1:
                dist.all_reduce(g, group=parallel_state.get_context_parallel_group())
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                shards = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(shards, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                g = torch.cat(shards, dim=p.partition_dim)
            grads[name] = g
        return per_token.detach(), cp_rank, grads


def main(out_path: str, tp: int, cp: int) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results = {}
    for name, case in CASES.items():
        loss_split, cp_rank, grads_split = run(tp, cp, *case)
        loss_full, _, grads_full = run(1, 1, *case)
        want = split_batch_for_cp({"loss": loss_full}, cp, cp_rank)["loss"]
        assert grads_full.keys() == grads_split.keys(), (sorted(grads_full), sorted(grads_split))
        grad_err = max((grads_split[k] - grads_full[k]).abs().max().item() / max(grads_full[k].abs().max().item(), 1e-12)
                       for k in grads_full)
        loss_err = ((loss_split - want).abs() / want.abs()).max().item()
        errors = torch.tensor([loss_err, grad_err])
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        results[name] = {"loss_rel_diff": errors[0].item(), "max_grad_rel_diff": errors[1].item(),
                         "num_params": len(grads_full)}
    if tp > 1:
        results["sequence_parallel"] = sequence_parallel_marks(tp, cp)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
