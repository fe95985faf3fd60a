"""Shapes and patterns every s2attn backend is checked on, and the check against the float64 oracle."""
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

    def layout(self) -> S2Layout:
        total = self.total_heads or self.heads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # some cases leave residues uncovered on purpose
            return S2Layout(total, total // (self.heads // self.kv_heads), self.block_size, self.local_blocks,
                            self.vert_stride, head_sliding_offset=self.head_sliding_offset,
                            num_dense_heads=self.num_dense_heads, homo_head=self.homo_head)


CASES = [
    Case("mha_partial_block", batch=2, s_q=150, s_kv=150),
    Case("gqa", heads=4, kv_heads=2, head_dim=64, block_size=32, s_q=200, s_kv=200, local_blocks=1, vert_stride=2),
    Case("dense_heads", heads=4, kv_heads=2, num_dense_heads=1, s_q=128, s_kv=128),
    Case("homo_head", homo_head=True, head_sliding_offset=1),
    Case("head_offset", heads=2, kv_heads=1, total_heads=8, head_offset=4, vert_stride=3),
    Case("q_after_kv", s_q=64, s_kv=256, q_offset=192, vert_stride=3),
    Case("kv_after_q", s_q=128, s_kv=100, kv_offset=32, block_size=32, local_blocks=1, vert_stride=2),
    Case("block64", s_q=320, s_kv=320, block_size=64, head_dim=64, local_blocks=2, vert_stride=2, heads=2, kv_heads=2),
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
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.dtype == (torch.float32 if name == "lse" else dtype), (name, g.dtype)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        if name == "lse":
            assert torch.equal(torch.isneginf(g), torch.isneginf(w)), "rows that see no key differ"
            g, w = torch.where(torch.isfinite(w), g, 0.0), torch.where(torch.isfinite(w), w, 0.0)
        assert not torch.isnan(g).any(), f"{name} has NaN"
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
