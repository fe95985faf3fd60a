"""torchrun worker: under tensor parallelism, a packed batch (PackedSeqParams, thd) through the hybrid
GPTModel against the same documents run one by one, on the same (TP-split) model.

    torchrun --standalone --nproc_per_node=TP packed_tp_worker.py OUT.json TP

Each rank compares its own per-token loss and its own gradient shards; rank 0 writes the largest
relative loss difference and the largest gradient difference relative to the gradient's scale
(maxima over ranks).
"""
import datetime
import itertools
import json
import sys
import warnings

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_s2 import S2AttentionConfig, build_gpt_model
from megatron_s2.parallel import model_parallel_session

warnings.filterwarnings("ignore")

VOCAB, DOCS, LAYOUT = 96, (32, 48, 16, 32), "DSSD"
S2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4)


def loss_and_grads(model, tokens, labels, packed: bool):
    model.zero_grad()
    bounds = [0, *itertools.accumulate(DOCS)]
    if packed:
        cu = torch.tensor(bounds, dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max(DOCS), max_seqlen_kv=max(DOCS))
        positions = torch.cat([torch.arange(n) for n in DOCS])[None]
        loss = model(tokens[None], positions, None, labels=labels[None], packed_seq_params=params)[0]
    else:
        loss = torch.cat([model(tokens[None, a:b], torch.arange(b - a)[None], None, labels=labels[None, a:b])[0]
                          for a, b in zip(bounds[:-1], bounds[1:])])
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def main(out_path: str, tp: int) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    with model_parallel_session(tp):
        config = TransformerConfig(num_layers=len(LAYOUT), hidden_size=64, num_attention_heads=8, num_query_groups=4,
                                   ffn_hidden_size=128, tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                   hidden_dropout=0.0, attention_dropout=0.0)
        torch.manual_seed(1234)
        model = build_gpt_model(config, S2, LAYOUT, vocab_size=VOCAB, max_sequence_length=128)
        tokens, labels = torch.randint(0, VOCAB, (2, sum(DOCS)), generator=torch.Generator().manual_seed(5))
        loss_p, grads_p = loss_and_grads(model, tokens, labels, packed=True)
        loss_d, grads_d = loss_and_grads(model, tokens, labels, packed=False)
    grad_err = max((grads_p[k] - grads_d[k]).abs().max().item() / max(grads_d[k].abs().max().item(), 1e-12)
                   for k in grads_d)
    errors = torch.tensor([((loss_p - loss_d).abs() / loss_d.abs()).max().item(), grad_err])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"loss_rel_diff": errors[0].item(), "max_grad_rel_diff": errors[1].item(),
                       "num_params": len(grads_d)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
