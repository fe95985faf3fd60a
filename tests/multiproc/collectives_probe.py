"""Probe: can BACKEND run, among this torchrun's ranks and on DEVICE tensors (local rank r on GPU
r modulo the GPUs there are, as the trainer places them), each collective that the engines call?
A bare process group, no model and none of our code: an error here is the backend's own.

    torchrun --standalone --nproc_per_node=2 collectives_probe.py OUT.json gloo cuda|cpu

Rank 0 writes {"backend", "device_count", "collectives": {name: "ok" | the error's first line}}.
The collectives (and who calls them):

- all_reduce: the loss and the gradient norm (both engines), TP's reductions (Megatron);
- reduce_scatter_tensor / all_gather_into_tensor: sequence parallelism (Megatron's mappings) and
  the all-gather context-parallel exchange (megatron_s2.context_parallel);
- the same two inside ``torch.distributed._coalescing_manager``: Megatron DDP's gradient
  reduce-scatter and parameter all-gather into the distributed optimizer's shards;
- all_to_all_single with uneven splits: the sparse context-parallel exchange.

Each result is checked against the value it must have; a wrong value is reported as one.
"""
import contextlib
import datetime
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

# torch >= 2.12 deprecates these two names; Megatron-Core 0.16 calls them, so the probe does.
warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor). is deprecated",
                        category=FutureWarning)


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got.cpu(), want):
        raise ValueError(f"wrong result: {got.cpu().tolist()} instead of {want.tolist()}")


def probes(rank: int, world: int, device: torch.device) -> dict:
    """name -> a function that runs the collective and checks its result."""
    def values(r, n):                                   # rank r's n values, distinct over ranks
        return torch.arange(n, dtype=torch.float32) + 100 * r
    total = lambda n: sum(values(r, n) for r in range(world))

    def all_reduce():
        x = values(rank, 4).to(device)
        dist.all_reduce(x)
        _check(x, total(4))

    def twice(collective, outputs, inputs, coalesced: bool):
        """collective(out, inp) on two pairs: in one _coalescing_manager (as Megatron DDP's buckets), or
        one call after the other."""
        with dist._coalescing_manager(async_ops=True) if coalesced else contextlib.nullcontext() as cm:
            for out, inp in zip(outputs, inputs):
                collective(out, inp)
        if coalesced:
            cm.wait()
        return outputs

    def reduce_scatter(coalesced: bool):
        def run():
            inputs = [values(rank, 2 * world).to(device) for _ in range(2)]
            for out in twice(dist.reduce_scatter_tensor, [torch.empty(2, device=device) for _ in range(2)], inputs,
                             coalesced):
                _check(out, total(2 * world)[2 * rank:2 * rank + 2])
        return run

    def all_gather(coalesced: bool):
        def run():
            inputs = [values(rank, 2).to(device) for _ in range(2)]
            for out in twice(dist.all_gather_into_tensor, [torch.empty(2 * world, device=device) for _ in range(2)],
                             inputs, coalesced):
                _check(out, torch.cat([values(r, 2) for r in range(world)]))
        return run

    def all_to_all_single():
        # rank r sends r + 1 + p values to rank p: uneven splits, as the sparse exchange has
        send_splits = [rank + 1 + p for p in range(world)]
        recv_splits = [r + 1 + rank for r in range(world)]
        send = torch.cat([torch.full((n,), float(10 * rank + p)) for p, n in enumerate(send_splits)]).to(device)
        recv = torch.empty(sum(recv_splits), device=device)
        dist.all_to_all_single(recv, send, recv_splits, send_splits)
        _check(recv, torch.cat([torch.full((n,), float(10 * r + rank)) for r, n in enumerate(recv_splits)]))

    return {"all_reduce": all_reduce, "reduce_scatter_tensor": reduce_scatter(False),
            "all_gather_into_tensor": all_gather(False),
            "reduce_scatter_tensor (coalesced)": reduce_scatter(True),
            "all_gather_into_tensor (coalesced)": all_gather(True), "all_to_all_single": all_to_all_single}


def main(out_path: str, backend: str, device_type: str) -> None:
    cuda = device_type == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % gpus) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, probe in probes(rank, world, device).items():
        try:
            probe()
            results[name] = "ok"
        except Exception as error:      # the backend's refusal (or a wrong value) is the probe's result
            results[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if cuda:
            torch.cuda.synchronize()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"backend": backend, "device_count": gpus, "collectives": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
