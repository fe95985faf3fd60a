"""Packed documents (THD, ``cu_seqlens``) through ``s2_attention``: every backend against the float64
dense oracle with the document mask (``reference_document_attention``, which builds the whole
pack's mask at once and never runs documents one by one), gradients included. The Triton checks
(the fused path: every document in one launch per kernel) run in an interpreter child process
(see ``attention_cases``).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import sys
from dataclasses import dataclass

import pytest
import torch

from attention_cases import Case, interpreted_results, run_checks
from relative_error import BF16_TOLERANCE, assert_outputs_close
from s2attn import S2Layout, s2_attention
from s2attn.reference import reference_attention, reference_document_attention


@dataclass(frozen=True)
class Pack:
    case: Case                              # heads, layout; its batch / s_q / s_kv are unused
    q_lengths: tuple[int, ...]
    kv_lengths: tuple[int, ...] | None = None      # None: the q lengths (self-attention)

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def kv(self) -> tuple[int, ...]:
        return self.kv_lengths or self.q_lengths


PACKS = [
    Pack(Case("shorter_than_a_block"), (5, 3, 9)),
    Pack(Case("not_block_aligned_gqa", heads=4, kv_heads=2, local_blocks=1, vert_stride=2), (37, 50, 70)),
    Pack(Case("length_one", vert_stride=3), (1, 1, 33, 1)),
    Pack(Case("one_document", heads=4, kv_heads=2), (150,)),
    Pack(Case("many_documents", heads=2, kv_heads=1, local_blocks=1, vert_stride=3),
         (7, 20, 1, 33, 16, 48, 2, 25, 11, 40)),
    Pack(Case("zero_length_documents"), (0, 30, 0, 0, 45, 0)),
    Pack(Case("head_offset", heads=2, kv_heads=1, total_heads=8, head_offset=4, vert_stride=3), (60, 45)),
    Pack(Case("query_sharding_tp_slice", heads=8, kv_heads=1, total_heads=24, head_offset=8, vert_stride=6,
              local_blocks=1, num_dense_heads=1, head_sharding="query"), (40, 100, 3)),
    Pack(Case("block32_homo", block_size=32, head_dim=64, homo_head=True, head_sliding_offset=1), (31, 64, 97)),
    # queries and keys of different lengths per document; the last query document has no key
    Pack(Case("q_kv_lengths_differ", heads=4, kv_heads=2), (20, 0, 40, 17), (33, 5, 40, 0)),
]
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-4)}


def cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def pack_inputs(pack: Pack, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = pack.case
    shapes = ((sum(pack.q_lengths), c.heads, c.head_dim), (sum(pack.kv), c.kv_heads, c.head_dim),
              (sum(pack.kv), c.kv_heads, c.head_dim))
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


def run_pack(backend: str, pack: Pack, q, k, v):
    """out, lse and the grads of a loss that uses both; backend "oracle" is the dense document mask,
    "<backend>-separately" runs each document alone (unpacked) and concatenates."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    cu_q, cu_kv = cu_seqlens(pack.q_lengths).to(q.device), cu_seqlens(pack.kv).to(q.device)
    if backend == "oracle":
        out, lse = reference_document_attention(q, k, v, pack.case.layout(), q.shape[-1] ** -0.5,
                                                pack.case.head_offset, cu_q, cu_kv)
    elif backend.endswith("-separately"):
        parts = [s2_attention(q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], pack.case.layout(),
                              head_offset=pack.case.head_offset, return_lse=True, backend=backend.split("-")[0])
                 for q0, q1, k0, k1 in zip(cu_q.tolist(), cu_q[1:].tolist(), cu_kv.tolist(), cu_kv[1:].tolist())]
        out, lse = torch.cat([o[0] for o, _ in parts]), torch.cat([l[0] for _, l in parts], 1)
    else:
        out, lse = s2_attention(q, k, v, pack.case.layout(), head_offset=pack.case.head_offset, return_lse=True,
                                backend=backend, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
                                max_seqlen_q=max(pack.q_lengths), max_seqlen_kv=max(pack.kv))
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).view(out.shape)
    loss = (out.double() * weights).sum() + 0.5 * torch.where(torch.isfinite(lse), lse, 0.0).double().sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def assert_pack_matches_oracle(backend: str, pack: Pack, dtype) -> None:
    q, k, v = pack_inputs(pack, dtype)
    got = run_pack(backend, pack, q, k, v)
    want = run_pack("oracle", pack, q.double(), k.double(), v.double())
    atol, rtol = TOLERANCES[dtype]
    assert got[1].shape == (pack.case.heads, sum(pack.q_lengths)), got[1].shape
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) if name == "lse" else dtype
        if name == "lse":
            assert torch.equal(torch.isneginf(g), torch.isneginf(w)), "rows that see no key differ"
            g, w = torch.where(torch.isfinite(w), g, 0.0), torch.where(torch.isfinite(w), w, 0.0)
        assert not torch.isnan(g).any(), f"{name} has NaN"
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# -- reference and torch backends, in process ------------------------------------------------------
@pytest.mark.parametrize("pack", PACKS, ids=lambda p: p.name)
def test_reference_backend(pack):
    assert_pack_matches_oracle("reference", pack, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("pack", PACKS, ids=lambda p: p.name)
def test_torch_backend(pack, dtype):
    assert_pack_matches_oracle("torch", pack, dtype)


@pytest.mark.parametrize("pack", PACKS, ids=lambda p: p.name)
def test_oracle_equals_documents_run_separately(pack):
    """The dense document-masked oracle equals the unpacked oracle run on each document alone."""
    q, k, v = pack_inputs(pack, torch.float64)
    c = pack.case
    out, lse = reference_document_attention(q, k, v, c.layout(), c.head_dim ** -0.5, c.head_offset,
                                            cu_seqlens(pack.q_lengths), cu_seqlens(pack.kv))
    q_starts, kv_starts = cu_seqlens(pack.q_lengths).tolist(), cu_seqlens(pack.kv).tolist()
    for i, (n_q, n_kv) in enumerate(zip(pack.q_lengths, pack.kv)):
        q_doc = slice(q_starts[i], q_starts[i] + n_q)
        kv_doc = slice(kv_starts[i], kv_starts[i] + n_kv)
        if n_q == 0:
            continue
        if n_kv == 0:
            assert (out[q_doc] == 0).all() and torch.isneginf(lse[:, q_doc]).all()
            continue
        want_out, want_lse = reference_attention(q[None, q_doc], k[None, kv_doc], v[None, kv_doc], c.layout(),
                                                 c.head_dim ** -0.5, c.head_offset, 0, 0)
        torch.testing.assert_close(out[q_doc], want_out[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse[:, q_doc], want_lse[0], atol=1e-12, rtol=1e-12)


def test_no_attention_across_documents():
    """Changing one document's keys and values changes no other document's output."""
    pack = PACKS[1]
    q, k, v = pack_inputs(pack, torch.float64)
    cu = cu_seqlens(pack.q_lengths)
    layout = pack.case.layout()
    before = s2_attention(q, k, v, layout, backend="torch", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    k2, v2 = k.clone(), v.clone()
    k2[37:87] += 1.0
    v2[37:87] -= 1.0
    after = s2_attention(q, k2, v2, layout, backend="torch", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    assert torch.equal(before[:37], after[:37]) and torch.equal(before[87:], after[87:])
    assert not torch.equal(before[37:87], after[37:87])


# -- bad cu_seqlens --------------------------------------------------------------------------------
def _bad_call(change: str):
    layout = S2Layout(4, 2, 16, 2, 2)
    q, k, v = torch.randn(40, 4, 32), torch.randn(40, 2, 32), torch.randn(40, 2, 32)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    kwargs = dict(cu_seqlens_q=cu, cu_seqlens_kv=cu)
    bad = {
        "int64": dict(cu_seqlens_q=cu.long()),
        "float": dict(cu_seqlens_kv=cu.float()),
        "meta_device": dict(cu_seqlens_kv=cu.to("meta")),
        "two_d": dict(cu_seqlens_q=cu.view(1, -1)),
        "one_entry": dict(cu_seqlens_q=cu[:1], cu_seqlens_kv=cu[:1]),
        "first_not_zero": dict(cu_seqlens_q=torch.tensor([1, 15, 40], dtype=torch.int32)),
        "decreasing": dict(cu_seqlens_kv=torch.tensor([0, 30, 20, 40], dtype=torch.int32),
                           cu_seqlens_q=torch.tensor([0, 10, 20, 40], dtype=torch.int32)),
        "last_not_total": dict(cu_seqlens_q=torch.tensor([0, 15, 39], dtype=torch.int32)),
        "doc_counts_differ": dict(cu_seqlens_kv=torch.tensor([0, 10, 20, 40], dtype=torch.int32)),
        "kv_missing": dict(cu_seqlens_kv=None),
        "max_seqlen_too_small": dict(max_seqlen_q=24),
        "q_offset": dict(q_offset=16),
    }[change]
    kwargs.update(bad)
    return lambda: s2_attention(q, k, v, layout, backend="torch", **kwargs)


@pytest.mark.parametrize("change, named", [
    ("int64", "cu_seqlens_q must be int32"), ("float", "cu_seqlens_kv must be int32"),
    ("meta_device", "cu_seqlens_kv must be on q's device"), ("two_d", "cu_seqlens_q must be 1-d"),
    ("one_entry", "cu_seqlens_q must be 1-d"), ("first_not_zero", "cu_seqlens_q must start at 0"),
    ("decreasing", r"cu_seqlens_kv must be non-decreasing, got cu_seqlens_kv\[1\]=30 > cu_seqlens_kv\[2\]=20"),
    ("last_not_total", r"cu_seqlens_q must end at the token count \(40\), got 39"),
    ("doc_counts_differ", "cu_seqlens_q and cu_seqlens_kv must count the same documents, got 2 and 3"),
    ("kv_missing", "must be given together"), ("max_seqlen_too_small", r"max_seqlen_q must be .* \(25\)"),
    ("q_offset", "q_offset and kv_offset must be 0 with cu_seqlens"),
])
def test_bad_cu_seqlens_named(change, named):
    with pytest.raises(ValueError, match=named):
        _bad_call(change)()


def test_packed_input_must_be_thd():
    cu = cu_seqlens((16, 16))
    q = torch.randn(1, 32, 4, 32)
    with pytest.raises(ValueError, match=r"q must be a 3-d tensor \[total_tokens, heads, head_dim\]"):
        s2_attention(q, q, q, S2Layout(4, 4, 16, 2, 2), cu_seqlens_q=cu, cu_seqlens_kv=cu)


def test_max_seqlen_without_cu_seqlens_refused():
    q = torch.randn(1, 32, 4, 32)
    with pytest.raises(ValueError, match=r"max_seqlen_q and max_seqlen_kv \(50, None\) go with cu_seqlens"):
        s2_attention(q, q, q, S2Layout(4, 4, 16, 2, 2), max_seqlen_q=50)


# -- Triton: the pack's work lists ----------------------------------------------------------------
def _document_index(pack: Pack, by_kv: bool, block_m=32, block_n=16):
    from s2attn.triton_attention import _document_index
    c = pack.case
    return _document_index(c.layout(), pack.q_lengths, pack.kv, c.head_offset, c.heads, block_m, block_n, by_kv,
                           torch.device("cpu"))


@pytest.mark.parametrize("by_kv", [False, True], ids=["by_q", "by_kv"])
@pytest.mark.parametrize("pack", PACKS, ids=lambda p: p.name)
def test_pack_index_is_each_documents_index(pack, by_kv):
    """The pack's items are every owned tile of every document in order, and each item's visited
    lists (every head) are those of the document's own index; cached on the lengths."""
    pytest.importorskip("triton")
    from s2attn.triton_attention import _sparse_index
    c, (block_m, block_n) = pack.case, (32, 16)
    index, items = _document_index(pack, by_kv)
    assert _document_index(pack, by_kv)[0] is index
    want_items = []
    for doc, (s_q, s_kv) in enumerate(zip(pack.q_lengths, pack.kv)):
        owned = -(-s_kv // block_n) if by_kv else -(-s_q // block_m)
        want_items += [[doc, t] for t in range(owned)]
    assert items.tolist() == want_items
    assert index.bounds.shape == (c.heads, len(items), 3)
    for i, (doc, t) in enumerate(items.tolist()):
        own = _sparse_index(c.layout(), pack.q_lengths[doc], pack.kv[doc], 0, 0, c.head_offset, c.heads, block_m,
                            block_n, by_kv, torch.device("cpu"))
        assert torch.equal(index.pattern, own.pattern)
        for h in range(c.heads):
            (first, mid, last), (o_first, o_mid, o_last) = index.bounds[h, i].tolist(), own.bounds[h, t].tolist()
            assert mid - first == o_mid - o_first, (doc, t, h)       # as many fully-active tiles
            assert torch.equal(index.tiles[first:last], own.tiles[o_first:o_last]), (doc, t, h)


# -- Triton, in the interpreter --------------------------------------------------------------------
@contextlib.contextmanager
def _counted_launches():
    """Counter of launches per kernel (every launch is ``kernel[grid](...)`` on the module's name),
    with DKDV_CHUNK 2 so that split dK/dV tiles make the reduce kernel run too."""
    import s2attn.triton_attention as ta
    names = ("_s2_forward_kernel", "_s2_backward_preprocess_kernel", "_s2_backward_dq_kernel",
             "_s2_backward_dkdv_kernel", "_s2_backward_dkdv_reduce_kernel")
    kernels, launches = {name: getattr(ta, name) for name in names}, collections.Counter()

    class Counted:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            launches[self.name] += 1
            return kernels[self.name][grid]

    for name in names:
        setattr(ta, name, Counted(name))
    ta.DKDV_CHUNK = 2
    try:
        yield launches
    finally:
        ta.DKDV_CHUNK = None
        for name, kernel in kernels.items():
            setattr(ta, name, kernel)


def _check_one_launch_per_kernel(pack: Pack) -> None:
    """Forward and backward of a whole pack launch each kernel once, whatever its document count,
    and still match the oracle with dK/dV tiles split into chunks (partials and the reduce)."""
    with _counted_launches() as launches:
        assert_pack_matches_oracle("triton", pack, torch.float32)
    assert dict(launches) == {name: 1 for name in launches} and len(launches) == 5, dict(launches)


def _check_pack_equals_documents_run_separately(pack: Pack) -> None:
    """The fused pack equals each document through the unpacked Triton kernels, concatenated."""
    q, k, v = pack_inputs(pack, torch.float32)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), run_pack("triton", pack, q, k, v),
                          run_pack("triton-separately", pack, q, k, v)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def _check_lengths_must_describe_the_pack() -> None:
    from s2attn.triton_attention import triton_packed_attention
    q, k, v = pack_inputs(PACKS[0], torch.float32)
    cu = cu_seqlens(PACKS[0].q_lengths)
    with pytest.raises(ValueError, match=r"must describe the pack \(3 documents, 17 / 17 tokens\)"):
        triton_packed_attention(q, k, v, PACKS[0].case.layout(), 0.1, 0, cu, cu, (5, 3, 8), (5, 3, 9))


def _interpreter_checks() -> dict:
    checks = {p.name: functools.partial(assert_pack_matches_oracle, "triton", p, torch.float32) for p in PACKS}
    by_name = {p.name: p for p in PACKS}
    checks.update({f"one_launch_per_kernel-{name}": functools.partial(_check_one_launch_per_kernel, by_name[name])
                   for name in ("one_document", "many_documents")})
    checks.update({f"equals_documents_run_separately-{name}":
                   functools.partial(_check_pack_equals_documents_run_separately, by_name[name])
                   for name in ("many_documents", "zero_length_documents", "q_kv_lengths_differ")})
    checks["lengths_must_describe_the_pack"] = _check_lengths_must_describe_the_pack
    return checks


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    return interpreted_results(__file__, tmp_path_factory.mktemp("triton_varlen") / "results.pt")


@pytest.mark.parametrize("check", list(_interpreter_checks()))
def test_triton_interpreted(interpreter_results, check):
    assert interpreter_results[check] == "", interpreter_results[check]


# -- GPU ---------------------------------------------------------------------------------------------
GPU_PACK = Pack(Case("gpu_60_documents", heads=8, kv_heads=2, head_dim=128, block_size=64, local_blocks=4,
                     vert_stride=8, num_dense_heads=1),
                tuple(int(n) for n in torch.randint(0, 140, (60,), generator=torch.Generator().manual_seed(0))))


@pytest.mark.gpu
@pytest.mark.parametrize("pack", PACKS + [GPU_PACK], ids=lambda p: p.name)
def test_gpu_triton_pack_bf16(pack):
    """bf16 through the fused pack within BF16_TOLERANCE (whole-tensor relative error) of the float64
    oracle, and two runs bit-identical (deterministic backward)."""
    q, k, v = (t.cuda() for t in pack_inputs(pack, torch.bfloat16))
    got = run_pack("triton", pack, q, k, v)
    assert_outputs_close(got, run_pack("oracle", pack, q.double(), k.double(), v.double()), BF16_TOLERANCE)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, run_pack("triton", pack, q, k, v)):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


if __name__ == "__main__":
    run_checks(_interpreter_checks(), sys.argv[1])
