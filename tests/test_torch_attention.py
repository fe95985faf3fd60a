"""The torch backend (and the API around it) against dense float64 masked attention."""
import pytest
import torch

from attention_cases import CASES, Case, assert_empty_inputs_answered, assert_matches_reference, make_inputs, run
from relative_error import assert_close_to_reference
from s2attn import S2Layout, merge_attention, s2_attention
from s2attn.api import _triton_supports


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 2e-5, 1e-4), (torch.float16, 2e-3, 2e-3)],
                         ids=["fp32", "fp16"])
def test_torch_backend_matches_reference(case, dtype, atol, rtol):
    assert_matches_reference("torch", case, dtype, atol, rtol)


# Band windows of 8 blocks of 64 rows (MHA) or 4 blocks of 128 rows (GQA 2:1): the band runs 3 or 2
# query blocks to a kernel entry; a block count that does not divide, a late query chunk, a dense head.
SUPERBLOCK_CASES = [
    Case("superblock_mha", batch=2, s_q=1000, s_kv=1000, head_dim=16, block_size=64, local_blocks=8, vert_stride=4),
    Case("superblock_gqa", s_q=700, s_kv=700, heads=4, kv_heads=2, head_dim=16, block_size=64, local_blocks=4,
         vert_stride=2, num_dense_heads=1),
    Case("superblock_q_after_kv", s_q=600, s_kv=1280, q_offset=640, heads=2, kv_heads=2, head_dim=16,
         block_size=64, local_blocks=8, vert_stride=3),
]


@pytest.mark.parametrize("case", SUPERBLOCK_CASES, ids=lambda c: c.name)
def test_band_superblocks_match_reference(case):
    from s2attn.torch_attention import _plan
    plan = _plan(case.layout(), case.s_q, case.s_kv, case.q_offset, case.kv_offset, case.head_offset, case.heads,
                 torch.device("cpu"))
    assert any(call.superblock > 1 for call in plan.band_calls)
    assert_matches_reference("torch", case, torch.float32, 2e-5, 1e-4)


@pytest.mark.parametrize("layout, q_offset", [
    (S2Layout(8, 8, 64, 8, 8), 0),                                        # the benchmark's pattern
    (S2Layout(8, 2, 64, 4, 4, head_sharding="query"), 0),                  # residues within a kv head
    (S2Layout(4, 4, 32, 2, 3, num_dense_heads=1), 32 * 37),               # a dense stack, a late chunk
], ids=["mha", "gqa_query", "dense_late"])
def test_strided_calls_need_no_mask_and_cover_each_block_once(layout, q_offset):
    """A stack's units step to the same column counts at the same stack blocks, so that with whole
    blocks of keys no strided call carries a mask (one costs the fused kernel about 10%); runs are
    grouped into longer calls plus calls of the later runs' extra columns, and the calls holding a
    query block's rows cover the older blocks the layout's block mask gives it, each once."""
    from s2attn.torch_attention import _plan
    bs, L = layout.block_size, layout.local_blocks
    s, nq = 40 * bs, 40
    plan = _plan(layout, s, s + q_offset, q_offset, 0, 0, layout.num_heads, torch.device("cpu"))
    runs = [run for stack in plan.stacks for span in stack.spans for run in span.runs]
    assert runs and all(run.keys_ok is None for run in runs)
    assert any(run.c0 > 0 for run in runs)
    qb0 = q_offset // bs
    nk = nq + qb0
    distance = torch.arange(qb0, qb0 + nq).view(-1, 1) - torch.arange(nk)        # query block - key block
    older = layout.block_mask(nq, nk, q_block_offset=qb0) & (distance >= L)
    for stack in plan.stacks:
        for kv_head, heads, offset in zip(stack.kv_heads, stack.heads, stack.offsets):
            for h in range(kv_head * layout.group_size, (kv_head + 1) * layout.group_size)[heads]:
                for block in range(nq):
                    calls = sorted((run.c0, run.cols) for span in stack.spans for run in span.runs
                                   if run.k0 <= block + offset < run.k1)
                    assert [c for c0, c1 in calls for c in range(c0, c1)] == list(range(int(older[h, block].sum())))


@pytest.mark.parametrize("case", CASES + SUPERBLOCK_CASES, ids=lambda c: c.name)
def test_torch_backend_split_into_the_smallest_pieces_matches_reference(case, monkeypatch):
    """Budgets of one block: every band backward call and every stacked span holds one block's or
    one run's rows (what long sequences do), and still equal the oracle."""
    import s2attn.torch_attention as torch_attention
    monkeypatch.setattr(torch_attention, "_BAND_GRAD_ELEMENTS", 1)
    monkeypatch.setattr(torch_attention, "_STACK_ROWS", 1)
    torch_attention._plan.cache_clear()
    try:
        assert_matches_reference("torch", case, torch.float32, 2e-5, 1e-4)
    finally:
        torch_attention._plan.cache_clear()


FUSED_CASES = [c for c in CASES + SUPERBLOCK_CASES if c.s_q == c.s_kv and c.q_offset == c.kv_offset]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.name)
def test_torch_backend_reads_views_of_a_fused_projection(case):
    """q, k and v as head slices of one [b, s, h + 2 kv, d] tensor (as a fused QKV projection gives
    them: every token's heads side by side), read in place where they hold whole blocks."""
    gen = torch.Generator().manual_seed(0)
    fused = torch.randn(case.batch, case.s_q, case.heads + 2 * case.kv_heads, case.head_dim, generator=gen)
    q, k, v = fused.split([case.heads, case.kv_heads, case.kv_heads], dim=2)
    assert_matches_reference("torch", case, torch.float32, 2e-5, 1e-4, inputs=(q, k, v))


@pytest.mark.parametrize("budget", [1 << 26, 700, 1], ids=["whole", "pieces", "rows"])
def test_matmul_fallback_matches_the_fused_cpu_kernel(budget, monkeypatch):
    """Off the CPU each call runs in matmuls, piece by piece; here both run on the CPU, with an
    expanded k/v (a stack's columns), a mask that hides whole rows, and pieces down to one row."""
    import s2attn.torch_attention as torch_attention
    monkeypatch.setattr(torch_attention, "_MATMUL_SCORES", budget)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 40, 16, generator=gen)
    k, v = (torch.randn(3, 1, 24, 16, generator=gen).expand(3, 2, 24, 16) for _ in range(2))
    allowed = torch.rand(1, 2, 40, 24, generator=gen) > 0.3
    allowed[0, 0, :3] = False
    mask = torch_attention._additive(allowed, torch.float32)
    out, lse = torch_attention._attend(q, k, v, mask, 0.3)
    got_out, got_lse = torch_attention._matmul_attend(q, k, v, mask, 0.3)
    torch.testing.assert_close(got_out, out)
    assert torch.equal(torch.isneginf(got_lse), torch.isneginf(lse)) and torch.isneginf(lse).any()
    torch.testing.assert_close(torch.where(torch.isfinite(lse), got_lse, 0.0), torch.where(torch.isfinite(lse), lse, 0.0))
    do, lse = torch.randn(out.shape, generator=gen), torch.where(torch.isneginf(lse), float("inf"), lse)
    want = torch_attention._attend_backward(do, q, k, v, out, lse, mask, 0.3)
    got = torch_attention._matmul_attend_backward(do, q, k, v, out, lse, mask, 0.3)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("gqa", "dense_heads", "q_after_kv", "query_gqa4")],
                         ids=lambda c: c.name)
def test_torch_backend_on_the_matmul_fallback_matches_reference(case, monkeypatch):
    """The whole torch path with the off-CPU kernel (matmuls) in place of the fused one."""
    import s2attn.torch_attention as torch_attention
    monkeypatch.setattr(torch_attention, "_attend", torch_attention._matmul_attend)
    monkeypatch.setattr(torch_attention, "_attend_backward", torch_attention._matmul_attend_backward)
    assert_matches_reference("torch", case, torch.float32, 2e-5, 1e-4)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("gqa", "mha_partial_block")], ids=lambda c: c.name)
def test_outputs_can_be_changed_in_place(case):
    """out and lse are the caller's: an in-place change keeps the gradient of what was returned."""
    q, k, v = (t.requires_grad_() for t in make_inputs(case, torch.float32))
    out, lse = s2_attention(q, k, v, case.layout(), return_lse=True, backend="torch")
    out.mul_(2.0)
    lse.add_(1.0)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    q64 = q.detach().double().requires_grad_()
    out64, lse64 = s2_attention(q64, k.detach().double(), v.detach().double(), case.layout(), return_lse=True,
                                backend="reference")
    (2.0 * out64.sum() + torch.where(torch.isfinite(lse64), lse64 + 1.0, 0.0).sum()).backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=1e-4, rtol=1e-4)


def test_queries_that_see_no_key_get_zero_and_neg_inf():
    case = Case("kv_after_q", s_q=64, s_kv=64, kv_offset=32, block_size=16)
    out, lse, dq, _, _ = run("torch", case, *make_inputs(case, torch.float32))
    assert torch.isneginf(lse[:, :, :32]).all() and torch.isfinite(lse[:, :, 32:]).all()
    assert (out[:, :32] == 0).all() and (dq[:, :32] == 0).all()


def test_transposed_megatron_layout_is_accepted():
    case = Case("sbhd", s_q=96, s_kv=96, batch=2)
    q, k, v = make_inputs(case, torch.float32)
    q_sbhd, k_sbhd, v_sbhd = (t.transpose(0, 1).contiguous() for t in (q, k, v))
    got = s2_attention(q_sbhd.transpose(0, 1), k_sbhd.transpose(0, 1), v_sbhd.transpose(0, 1), case.layout())
    torch.testing.assert_close(got, s2_attention(q, k, v, case.layout()))


def test_fp16_large_logits_match_reference():
    """Logits in the thousands: every output within 3e-3 of the float64 oracle's largest value
    (measured here: 7e-4 at most)."""
    assert_close_to_reference("torch", Case("large", s_q=128, s_kv=128), torch.float16, 3e-3, ord=float("inf"),
                              scale=30.0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_merge_of_disjoint_key_halves_equals_full_attention(backend):
    """float64 parts merge in float64: the unsharded result to float64 rounding, lse included."""
    case = Case("merge", s_q=128, s_kv=128, heads=4, kv_heads=2)
    layout = case.layout()
    q, k, v = (t.requires_grad_() for t in make_inputs(case, torch.float64))
    full, full_lse = s2_attention(q, k, v, layout, return_lse=True, backend=backend)
    parts = [s2_attention(q, k[:, lo:hi], v[:, lo:hi], layout, kv_offset=lo, return_lse=True, backend=backend)
             for lo, hi in ((0, 64), (64, 128))]
    merged, merged_lse = merge_attention([p[0] for p in parts], [p[1] for p in parts], return_lse=True)
    assert full_lse.dtype == merged_lse.dtype == torch.float64
    torch.testing.assert_close(merged, full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(merged_lse, full_lse, atol=1e-12, rtol=1e-12)
    grads_full = torch.autograd.grad(full.square().sum(), (q, k, v))
    grads_merged = torch.autograd.grad(merged.square().sum(), (q, k, v))
    for gm, gf in zip(grads_merged, grads_full):
        torch.testing.assert_close(gm, gf, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_inputs_are_answered_alike(backend):
    assert_empty_inputs_answered(backend)


@pytest.mark.parametrize("dtype, head_dim, block_size, triton", [
    (torch.bfloat16, 128, 64, True), (torch.float16, 64, 16, True), (torch.float32, 32, 128, True),
    (torch.float64, 64, 64, False),      # the kernels take no float64: auto must pick the torch path
    (torch.float16, 48, 64, False), (torch.float16, 512, 64, False), (torch.float16, 64, 256, False),
])
def test_auto_dispatch_sends_triton_only_what_its_kernels_take(dtype, head_dim, block_size, triton):
    assert _triton_supports(dtype, head_dim, block_size) is triton


def test_merge_keeps_unseen_rows_zero_without_nan():
    out = torch.zeros(1, 4, 2, 8, requires_grad=True)
    lse = torch.full((1, 2, 4), float("-inf"), requires_grad=True)
    merged, merged_lse = merge_attention([out, out], [lse, lse], return_lse=True)
    assert (merged == 0).all() and torch.isneginf(merged_lse).all()
    merged.sum().backward()
    assert not torch.isnan(out.grad).any() and not torch.isnan(lse.grad).any()


def test_layout_is_cached_not_rebuilt_per_call():
    from s2attn.torch_attention import _plan
    case = Case("cache", s_q=64, s_kv=64)
    q, k, v = make_inputs(case, torch.float32)
    layout = case.layout()
    s2_attention(q, k, v, layout, backend="torch")
    before = _plan.cache_info()
    s2_attention(q, k, v, layout, backend="torch")
    after = _plan.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


@pytest.mark.parametrize("change, field", [
    (dict(k=torch.zeros(1, 32, 4, 16, dtype=torch.float16)), "dtype"),
    (dict(q=torch.zeros(1, 32, 3, 16)), "multiple of kv heads"),
    (dict(q=torch.zeros(32, 4, 16)), "4-d"),
    (dict(q_offset=8), "q_offset"),
    (dict(kv_offset=-16), "kv_offset"),
    (dict(head_offset=2, q=torch.zeros(1, 32, 4, 16)), "head_offset"),
    (dict(backend="cuda"), "backend"),
    (dict(k=torch.zeros(1, 32, 4, 8), v=torch.zeros(1, 32, 4, 8)), "head_dim"),
    (dict(q=torch.zeros(1, 32, 4, 16, dtype=torch.long)), "floating point"),
    (dict(k=torch.zeros(1, 32, 4, 16, device="meta"), v=torch.zeros(1, 32, 4, 16, device="meta")), "device"),
])
def test_bad_input_raises_value_error_naming_it(change, field):
    layout = S2Layout(4, 4, 16, 2, 2)
    args = dict(q=torch.zeros(1, 32, 4, 16), k=torch.zeros(1, 32, 4, 16), v=torch.zeros(1, 32, 4, 16),
                layout=layout) | change
    with pytest.raises(ValueError, match=field):
        s2_attention(**args)
