"""Measuring S2 attention against its peers: dense causal SDPA and FlexAttention on the same mask.

Library side of ``scripts/bench_attention.py``: the timing loop, the FLOPs that the computed blocks
cost, the peers, and the peak memory of one forward+backward (CUDA allocator high-water mark on a
GPU; the peak resident set of a fresh child process on the CPU, where torch has no allocator stats).
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from .api import s2_attention
from .layout import S2Layout


@dataclass(frozen=True)
class AttentionShape:
    """One benchmark point."""
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str          # "float32" | "float16" | "bfloat16"
    device: str         # "cpu" | "cuda"

    def inputs(self, requires_grad: bool = True, seed: int = 0):
        gen = torch.Generator(device=self.device).manual_seed(seed)
        dtype = getattr(torch, self.dtype)
        q = torch.randn(self.batch, self.seq_len, self.heads, self.head_dim, generator=gen, device=self.device, dtype=dtype)
        k, v = (torch.randn(self.batch, self.seq_len, self.kv_heads, self.head_dim, generator=gen, device=self.device,
                            dtype=dtype) for _ in range(2))
        return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def attention_flops(layout: S2Layout | None, shape: AttentionShape) -> tuple[float, float]:
    """(forward, backward) matmul FLOPs over the token pairs actually computed; None: dense causal."""
    s = shape.seq_len
    if layout is None:
        pairs_per_head = s * (s + 1) / 2 * shape.heads
    else:
        bs = layout.block_size
        n = -(-s // bs)
        mask = layout.block_mask(n, n)
        diagonal = mask.diagonal(dim1=1, dim2=2).sum().item()
        pairs_per_head = (mask.sum().item() - diagonal) * bs * bs + diagonal * bs * (bs + 1) / 2
    forward = 4.0 * shape.batch * shape.head_dim * pairs_per_head
    return forward, 2.5 * forward


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
"""Names of ``torch.nn.attention.SDPBackend`` members a benchmark can pin SDPA to."""


def sdpa_causal_fn(backend: str | None = None):
    """Dense causal attention with PyTorch's fused SDPA; [b, s, h, d] in and out.

    backend: None lets PyTorch choose (its CPU flash kernel on the CPU); a key of ``SDPA_BACKENDS``
    pins that kernel (``torch.nn.attention.sdpa_kernel``), which raises RuntimeError where it
    cannot run the shape or dtype instead of falling back to another.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = None if backend is None else getattr(SDPBackend, SDPA_BACKENDS[backend])

    def run(q, k, v):
        q_bhsd, k_bhsd, v_bhsd = (t.transpose(1, 2) for t in (q, k, v))
        with contextlib.nullcontext() if pinned is None else sdpa_kernel(pinned):
            out = torch.nn.functional.scaled_dot_product_attention(
                q_bhsd, k_bhsd, v_bhsd, is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    return run


def flex_mask_mod(layout: S2Layout, device):
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of the S2 pattern, token level: key
    ``kv_idx`` is attended by query ``q_idx`` of query head ``h`` (the layout's global heads)."""
    bs = layout.block_size
    residue, dense = layout.head_pattern(0, layout.num_heads, device)     # per query head

    def s2_mask(b, h, q_idx, kv_idx):
        i, j = q_idx // bs, kv_idx // bs
        local = (i - j) < layout.local_blocks
        return (kv_idx <= q_idx) & (local | (j % layout.vert_stride == residue[h]) | dense[h])
    return s2_mask


def flex_block_mask(layout: S2Layout, seq_len: int, device):
    """FlexAttention's ``BlockMask`` of the S2 pattern on one causal sequence of ``seq_len`` tokens,
    per query head ([1, heads, ...]; tiles of ``layout.block_size``), built from the layout's own
    block mask (``BlockMask.from_kv_blocks``) instead of ``create_block_mask``, which evaluates the
    mask at every token pair (uncompiled, about 10.6 bytes per [heads, q, kv] element: 170 GiB at
    32k and 16 heads). A tile strictly below the diagonal whose query block is whole is *full*
    (every pair attended, no mask_mod call); the diagonal tiles and a last, cut query block are
    *partial* and use ``flex_mask_mod``'s token-level mask. Equal to ``create_block_mask(
    flex_mask_mod(layout, device), None, heads, seq_len, seq_len, BLOCK_SIZE=block_size)``
    (tests/test_attention_benchmark.py); memory O(heads * blocks^2)."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = layout.block_size
    n = -(-seq_len // bs)
    active = layout.block_mask(n, n, device=device)                        # [heads, n, n]
    i = torch.arange(n, device=device)
    whole_row = ((i + 1) * bs <= seq_len).view(-1, 1)
    full = active & (i.view(-1, 1) > i.view(1, -1)) & whole_row
    partial = active & ~full

    def ordered(mask):      # FlexAttention's form: per row the count, then the active columns first, ascending
        mask = mask.unsqueeze(0).to(torch.int32)
        indices = torch.argsort(mask, dim=-1, descending=True, stable=True)
        return mask.sum(-1, dtype=torch.int32), indices.to(torch.int32)
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=bs,
                                    mask_mod=flex_mask_mod(layout, device), seq_lengths=(seq_len, seq_len))


def flex_attention_fn(layout: S2Layout, seq_len: int, device: str):
    """A compiled FlexAttention with the S2 block mask (``flex_block_mask``); [b, s, h, d] in and out."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = flex_block_mask(layout, seq_len, device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        out = compiled(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=block_mask,
                       enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    return run


def s2_fn(layout: S2Layout, backend: str):
    return lambda q, k, v: s2_attention(q, k, v, layout, backend=backend)


def s2_packed_fn(layout: S2Layout, backend: str, documents: int):
    """S2 with every sequence cut into ``documents`` equal documents (seq_len a multiple of it),
    through the packed (THD, cu_seqlens) API; [b, s, h, d] in and out. Its work is that of
    ``packed_shape``: batch * documents sequences of seq_len / documents tokens."""
    def run(q, k, v):
        b, s = q.shape[:2]
        cu = torch.arange(0, b * s + 1, s // documents, dtype=torch.int32, device=q.device)
        out = s2_attention(*(t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)), layout, backend=backend,
                           cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s // documents,
                           max_seqlen_kv=s // documents)
        return out.view(q.shape)
    return run


def packed_shape(shape: AttentionShape, documents: int) -> AttentionShape:
    """The shape whose attention work equals ``shape`` cut into ``documents`` equal documents
    per sequence (ValueError unless seq_len is a multiple of documents)."""
    if documents < 1 or shape.seq_len % documents:
        raise ValueError(f"documents ({documents}) must be >= 1 and divide seq_len ({shape.seq_len})")
    return replace(shape, batch=shape.batch * documents, seq_len=shape.seq_len // documents)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_attention(fn, shape: AttentionShape, repeats: int, backward: bool = True) -> dict:
    """Median seconds of forward, backward and forward+backward (after one warm-up call)."""
    q, k, v = shape.inputs(requires_grad=backward)
    fwd, bwd = [], []
    for it in range(repeats + 1):
        for t in (q, k, v):
            t.grad = None
        _sync(shape.device)
        start = time.perf_counter()
        out = fn(q, k, v)
        _sync(shape.device)
        mid = time.perf_counter()
        if backward:
            out.backward(torch.ones_like(out))
            _sync(shape.device)
        end = time.perf_counter()
        if it:                                   # the first call compiles / warms caches
            fwd.append(mid - start)
            bwd.append(end - mid)
        del out
    result = {"forward_s": statistics.median(fwd)}
    if backward:
        result["backward_s"] = statistics.median(bwd)
        result["fwd_bwd_s"] = statistics.median(f + b for f, b in zip(fwd, bwd))
    return result


@contextlib.contextmanager
def competing_process():
    """One busy process beside the benchmark (a pure-Python spin loop in a child interpreter), as
    on a shared machine; started on entry, killed and reaped on exit, whatever happens inside."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux). VmHWM belongs to this process image;
    ru_maxrss would carry the parent's peak across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _peak_rss_child(layout: S2Layout, backend: str, shape: AttentionShape, pipe) -> None:
    q, k, v = shape.inputs()
    before = peak_rss_bytes()
    out = s2_attention(q, k, v, layout, backend=backend)
    out.backward(torch.ones_like(out))
    pipe.send(peak_rss_bytes() - before)


def peak_memory_bytes(layout: S2Layout, backend: str, shape: AttentionShape) -> int:
    """Extra memory one forward+backward needs beyond its inputs."""
    if shape.device == "cuda":
        q, k, v = shape.inputs()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = s2_attention(q, k, v, layout, backend=backend)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peak_rss_child, args=(layout, backend, shape, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return value


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 and math.isfinite(seconds) else float("nan")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    return f"{model}, {torch.get_num_threads()} threads"


def describe(layout: S2Layout, shape: AttentionShape) -> dict:
    return {"shape": asdict(shape), "layout": asdict(layout), "density": layout.density(shape.seq_len)}
