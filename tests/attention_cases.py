"""Shapes and patterns every s2attn backend is checked on, the check against the float64 oracle,
and the harness that runs checks in a Triton-interpreter child process.

Why a child process: ``triton.jit`` picks the interpreter when it decorates a function, so
TRITON_INTERPRET=1 must be set before triton itself is imported (its own library is jit code too).
The pytest process keeps compiled kernels for the other test files; a test file's interpreted
checks all run in one child (the file run as a script, calling ``run_checks``), which reports a
pass or the failure text of each check.
"""
import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass

import torch

from s2attn import S2Layout, s2_attention


@dataclass(frozen=True)
class Case:
    name: str
    batch: int = 1
    s_q: int = 160
    s_kv: int = 160
    heads: int = 4              # query heads passed in (this rank's)
    kv_heads: int = 4
    head_dim: int = 32
    block_size: int = 16
    local_blocks: int = 2
    vert_stride: int = 4
    total_heads: int | None = None     # the layout's heads (> heads under head_offset)
    head_offset: int = 0
    q_offset: int = 0
    kv_offset: int = 0
    num_dense_heads: int = 0
    homo_head: bool = False
    head_sliding_offset: int = 0
    head_sharding: str = "kv"

    def layout(self) -> S2Layout:
        total = self.total_heads or self.heads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # some cases leave residues uncovered on purpose
            return S2Layout(total, total // (self.heads // self.kv_heads), self.block_size, self.local_blocks,
                            self.vert_stride, head_sliding_offset=self.head_sliding_offset,
                            num_dense_heads=self.num_dense_heads, homo_head=self.homo_head,
                            head_sharding=self.head_sharding)


CASES = [
    Case("mha_partial_block", batch=2, s_q=150, s_kv=150),
    Case("gqa", heads=4, kv_heads=2, head_dim=64, block_size=32, s_q=200, s_kv=200, local_blocks=1, vert_stride=2),
    Case("dense_heads", heads=4, kv_heads=2, num_dense_heads=1, s_q=128, s_kv=128),
    Case("homo_head", homo_head=True, head_sliding_offset=1),
    Case("head_offset", heads=2, kv_heads=1, total_heads=8, head_offset=4, vert_stride=3),
    Case("q_after_kv", s_q=64, s_kv=256, q_offset=192, vert_stride=3),
    Case("kv_after_q", s_q=128, s_kv=100, kv_offset=32, block_size=32, local_blocks=1, vert_stride=2),
    Case("block64", s_q=320, s_kv=320, block_size=64, head_dim=64, local_blocks=2, vert_stride=2, heads=2, kv_heads=2),
    # per-query-head residues: GQA 4:1, and a TP slice (heads 8..15 of 16) of GQA 8:1 with a dense kv head
    Case("query_gqa4", heads=8, kv_heads=2, vert_stride=8, head_sliding_offset=1, head_sharding="query"),
    Case("query_gqa8_tp_slice", heads=8, kv_heads=1, total_heads=24, head_offset=8, vert_stride=6,
         local_blocks=1, num_dense_heads=1, head_sharding="query", s_q=144, s_kv=144),
]


def make_inputs(case: Case, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    shape_q = (case.batch, case.s_q, case.heads, case.head_dim)
    shape_kv = (case.batch, case.s_kv, case.kv_heads, case.head_dim)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
            for shape in (shape_q, shape_kv, shape_kv)]


def run(backend, case: Case, q, k, v, layout=None):
    """out, lse and the grads of a loss that uses both (so lse's gradient path is exercised)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = s2_attention(q, k, v, layout or case.layout(), head_offset=case.head_offset, q_offset=case.q_offset,
                            kv_offset=case.kv_offset, return_lse=True, backend=backend)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).view(out.shape)
    loss = (out.double() * weights).sum() + 0.5 * torch.where(torch.isfinite(lse), lse, 0.0).double().sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def assert_matches_reference(backend, case: Case, dtype, atol, rtol, inputs=None, device="cpu"):
    """The backend's out, lse, dq, dk, dv equal the float64 oracle's (on the same inputs)."""
    q, k, v = (t.to(device) for t in (inputs or make_inputs(case, dtype)))
    got = run(backend, case, q, k, v)
    want = run("reference", case, q.double(), k.double(), v.double())
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.dtype == (lse_dtype if name == "lse" else dtype), (name, g.dtype)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        if name == "lse":
            assert torch.equal(torch.isneginf(g), torch.isneginf(w)), "rows that see no key differ"
            g, w = torch.where(torch.isfinite(w), g, 0.0), torch.where(torch.isfinite(w), w, 0.0)
        assert not torch.isnan(g).any(), f"{name} has NaN"
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_empty_inputs_answered(backend: str, device="cpu") -> None:
    """No query (s_q 0 or batch 0): empty out and lse. No key (s_kv 0): out 0 and lse -inf. Both
    differentiable with zero gradients of the inputs' shapes, whatever the backend."""
    layout = S2Layout(4, 2, 16, 2, 2)
    for batch, s_q, s_kv in ((2, 0, 32), (0, 32, 32), (2, 32, 0), (2, 0, 0)):
        q = torch.randn(batch, s_q, 4, 32, device=device, requires_grad=True)
        k, v = (torch.randn(batch, s_kv, 2, 32, device=device, requires_grad=True) for _ in range(2))
        out, lse = s2_attention(q, k, v, layout, return_lse=True, backend=backend)
        assert out.shape == q.shape and out.dtype == q.dtype and (out == 0).all(), (batch, s_q, s_kv)
        assert lse.shape == (batch, 4, s_q) and lse.dtype == torch.float32 and torch.isneginf(lse).all()
        grads = torch.autograd.grad(out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum(), (q, k, v))
        for t, g in zip((q, k, v), grads):
            assert g.shape == t.shape and (g == 0).all(), (batch, s_q, s_kv)

# -- the Triton interpreter child process -----------------------------------------------------------
def run_checks(checks: dict, result_path: str) -> None:
    """In the child: run every check (a callable), save {name: "" or the failure's traceback}."""
    import s2attn.triton_attention
    assert s2attn.triton_attention.INTERPRETED, "TRITON_INTERPRET=1 did not take effect"
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = ""
        except Exception:
            results[name] = traceback.format_exc()
    torch.save(results, result_path)


def interpreted_results(script: str, result_path: str, timeout: int = 1200) -> dict:
    """Run ``script RESULT_PATH`` (a test file whose __main__ calls ``run_checks``) with
    TRITON_INTERPRET=1 and return its results."""
    proc = subprocess.run([sys.executable, script, str(result_path)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(result_path)
