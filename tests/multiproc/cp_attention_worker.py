"""Worker: attention of a sequence split over CP ranks vs the unsplit attention (every rank
computes the unsplit reference itself from the same seed). Writes, per case, max relative errors,
the bytes ``exchange_bytes`` predicts and the bytes that actually went through the all-to-all.

    torchrun --standalone --nproc_per_node=N tests/multiproc/cp_attention_worker.py OUT.json
"""
import json
import sys
import warnings

import torch
import torch.distributed as dist

import megatron_s2.context_parallel as context_parallel
from megatron_s2.context_parallel import CPGeometry, cp_attention, exchange_bytes, split_batch_for_cp
from s2attn import S2Layout, s2_attention

CASES = {   # name: (layout heads, layout kv heads, layout kwargs or None for dense, block, seq, this
            #        rank's query heads, their head_offset: a TP slice when fewer than the layout's)
    "s2_mha": (4, 4, dict(local_blocks=2, vert_stride=4), 16, 256, 4, 0),
    "s2_gqa": (4, 2, dict(local_blocks=1, vert_stride=3), 16, 256, 4, 0),
    "s2_dense_heads": (4, 2, dict(local_blocks=2, vert_stride=4, num_dense_heads=1), 16, 256, 4, 0),
    "s2_query_gqa4": (8, 2, dict(local_blocks=1, vert_stride=8, head_sliding_offset=1, head_sharding="query"),
                      16, 256, 8, 0),
    "s2_query_gqa4_tp_slice": (16, 4, dict(local_blocks=1, vert_stride=8, head_sliding_offset=1,
                                           head_sharding="query"), 16, 256, 8, 8),
    "dense": (4, 2, None, 16, 256, 4, 0),
}


class AllToAllRecorder:
    """Wraps our own ``context_parallel._all_to_all`` to count the bytes each call sends and receives."""

    def __init__(self):
        self.calls = []
        self.inner = context_parallel._all_to_all

    def __call__(self, send, send_counts, recv_counts, group):
        recv = self.inner(send, send_counts, recv_counts, group)
        self.calls.append({"sent": send.numel() * send.element_size(), "received": recv.numel() * recv.element_size()})
        return recv


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main(out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recorder = context_parallel._all_to_all = AllToAllRecorder()
    results = {}
    for name, (total_heads, total_kv_heads, kw, bs, seq, heads, head_offset) in CASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A dense layer is the S2 pattern with stride 1 (every older block strided-active).
            layout = S2Layout(total_heads, total_kv_heads, bs, **(kw or dict(local_blocks=1, vert_stride=1)))
        kv_heads = heads // layout.group_size
        gen = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(2, seq, n, 32, generator=gen, dtype=torch.float64) for n in (heads, kv_heads, kv_heads))
        w = torch.randn(2, seq, heads, 32, generator=gen, dtype=torch.float64)

        def attend(q_, k_, v_, q_offset):
            return s2_attention(q_, k_, v_, layout, head_offset=head_offset, q_offset=q_offset, backend="torch")

        full = [t.clone().requires_grad_() for t in (q, k, v)]
        (attend(*full, 0) * w).sum().backward()
        geo = CPGeometry(world, rank, seq, bs)
        want = split_batch_for_cp({"out": attend(q, k, v, 0), "dq": full[0].grad, "dk": full[1].grad,
                                   "dv": full[2].grad}, world, rank)
        for exchange in ("all_gather", "sparse") if kw else ("all_gather",):
            local = split_batch_for_cp({"q": q, "k": k, "v": v, "w": w}, world, rank)
            qkv = [local[x].clone().requires_grad_() for x in "qkv"]
            recorder.calls.clear()
            out = cp_attention(attend, *qkv, geo, None, layout=layout if kw else None, head_offset=head_offset,
                               exchange=exchange)
            forward_calls = list(recorder.calls)
            (out * local["w"]).sum().backward()
            backward_calls = recorder.calls[len(forward_calls):]
            got = {"out": out.detach(), "dq": qkv[0].grad, "dk": qkv[1].grad, "dv": qkv[2].grad}
            errs = {key: rel(got[key], want[key]) for key in got}
            # What the layout predicts this rank needs from the others, counted from block_mask alone:
            # the union over each kv head's query heads of the blocks they read.
            total = seq // bs
            mask = layout.block_mask(total, total, head_offset=head_offset, num_heads=heads)
            mask = mask.view(kv_heads, layout.group_size, total, total).any(1)
            mine = split_batch_for_cp({"rows": torch.arange(total).view(1, -1)}, world, rank)["rows"].flatten()
            owned = torch.zeros(total, dtype=torch.bool)
            owned[mine] = True
            needed = mask[:, mine].any(1) & ~owned                        # [kv_heads, total]
            block_bytes = 2 * 2 * bs * 32 * 8                            # K and V, batch 2, float64
            results[f"{name}/{exchange}"] = {
                "errors": errs,
                "bytes": exchange_bytes(layout if kw else None, geo, batch=2, kv_heads=kv_heads, head_dim=32,
                                        element_bytes=8, head_offset=head_offset),
                "predicted_sparse_bytes": int(needed.sum()) * block_bytes,
                "all_to_all_forward": forward_calls,
                "all_to_all_backward": backward_calls,
            }
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
