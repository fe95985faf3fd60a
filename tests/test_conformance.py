"""Conformance with the patterns users bring: each peer's rule is stated here in its own words (no
code of theirs), then checked against ``S2Layout.block_mask`` over a seeded sweep, against the
backends (float64 attention over the peer's own mask), and against the shipped recipes.

Block coordinates: query block i, key block j (absolute), global query head h of H, kv head
g = h // (H / G) of G. Every rule keeps the causal blocks j <= i only, and the local window
i - j < local_blocks; they differ in which older blocks a head takes:

* Phi-3-small (its model code): K/V are repeated to all H query heads and every query head takes
  the blocks with (j + h * max(1, stride // H) + 1) % stride == 0. No dense heads (Phi-3-small
  has dense layers instead), no shared residue.
* The S2 authors' library, given kv heads: the residue comes from the kv head g, but the step
  defaults to max(1, stride // H), the query-head count: (j + g * max(1, stride // H) + offset)
  % stride == 0.
* Ours (README, "The S2 pattern"): (j + r * step + offset) % stride == 0 with r = g
  (head_sharding "kv", step max(1, stride // G)) or r = h ("query", step max(1, stride // H));
  head_sliding_step replaces the step, homo_head makes r = 0, and the query heads of the last
  num_dense_heads kv heads take every causal block.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
import random
import sys
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from attention_cases import interpreted_results, run_checks
from megatron_s2.config import S2AttentionConfig, resolve_hybrid_layout, validate_hybrid_model
from megatron_s2.training.config import RECIPES_DIR, compose_config, validate
from s2attn import S2Layout, s2_attention
from s2attn.reference import masked_attention


# -- the rules ---------------------------------------------------------------------------------------
def phi3_small_rule(i, j, h, *, num_heads, local_blocks, vert_stride):
    if j > i:
        return False
    return i - j < local_blocks or (j + h * max(1, vert_stride // num_heads) + 1) % vert_stride == 0


def authors_library_rule(i, j, h, *, num_heads, num_kv_heads, local_blocks, vert_stride, offset):
    if j > i:
        return False
    kv_head = h // (num_heads // num_kv_heads)
    return i - j < local_blocks or (j + kv_head * max(1, vert_stride // num_heads) + offset) % vert_stride == 0


def our_rule(i, j, h, *, num_heads, num_kv_heads, local_blocks, vert_stride, head_sliding_offset=0,
             head_sliding_step=None, num_dense_heads=0, homo_head=False, head_sharding="kv", **_):
    if j > i:
        return False
    kv_head = h // (num_heads // num_kv_heads)
    if kv_head >= num_kv_heads - num_dense_heads:
        return True
    by_query = head_sharding == "query"
    step = head_sliding_step if head_sliding_step is not None else max(1, vert_stride // (num_heads if by_query else num_kv_heads))
    r = 0 if homo_head else (h if by_query else kv_head)
    return i - j < local_blocks or (j + r * step + head_sliding_offset) % vert_stride == 0


def rule_mask(rule, heads, q_blocks, kv_blocks) -> torch.Tensor:
    """bool [len(heads), len(q_blocks), len(kv_blocks)] of ``rule(i, j, h)``."""
    return torch.tensor([[[rule(i, j, h) for j in kv_blocks] for i in q_blocks] for h in heads])


def layout_of(**kw) -> S2Layout:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # the sweep includes patterns that leave residues unseen
        return S2Layout(**kw)


# -- block_mask over a seeded sweep ------------------------------------------------------------------
def _sweep(seed: int = 0, count: int = 60):
    """(layout kwargs, head range, block ranges): GQA, dense heads, homo, offsets, steps, head
    ranges that need not start a kv group, rectangular and offset blocks."""
    rng = random.Random(seed)
    for _ in range(count):
        kv_heads, group = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 4, 8])
        heads = kv_heads * group
        kw = dict(num_heads=heads, num_kv_heads=kv_heads, block_size=16, local_blocks=rng.randint(1, 4),
                  vert_stride=rng.randint(1, 10), head_sliding_offset=rng.randint(-2, 3),
                  head_sliding_step=rng.choice([None, None, 0, 1, 3]),
                  num_dense_heads=rng.choice([0, 0, 0, min(1, kv_heads)]), homo_head=rng.random() < 0.15,
                  head_sharding=rng.choice(["kv", "query"]))
        head_offset = rng.randrange(heads)
        head_range = range(head_offset, head_offset + rng.randint(1, heads - head_offset))
        q0, k0 = rng.randint(0, 6), rng.randint(0, 6)
        yield kw, head_range, range(q0, q0 + rng.randint(1, 9)), range(k0, k0 + rng.randint(1, 12))


def _block_mask(layout, heads, q_blocks, kv_blocks):
    return layout.block_mask(len(q_blocks), len(kv_blocks), q_block_offset=q_blocks.start,
                             kv_block_offset=kv_blocks.start, head_offset=heads.start, num_heads=len(heads))


@pytest.mark.parametrize("kw, heads, q_blocks, kv_blocks", list(_sweep()))
def test_block_mask_follows_our_rule(kw, heads, q_blocks, kv_blocks):
    want = rule_mask(functools.partial(our_rule, **kw), heads, q_blocks, kv_blocks)
    assert torch.equal(_block_mask(layout_of(**kw), heads, q_blocks, kv_blocks), want)


@pytest.mark.parametrize("kw, heads, q_blocks, kv_blocks", list(_sweep(seed=1)))
def test_query_sharding_with_offset_1_is_phi3_small(kw, heads, q_blocks, kv_blocks):
    shape = {k: kw[k] for k in ("num_heads", "num_kv_heads", "block_size", "local_blocks", "vert_stride")}
    layout = layout_of(**shape, head_sliding_offset=1, head_sharding="query")
    want = rule_mask(functools.partial(phi3_small_rule, num_heads=kw["num_heads"], local_blocks=kw["local_blocks"],
                                       vert_stride=kw["vert_stride"]), heads, q_blocks, kv_blocks)
    assert torch.equal(_block_mask(layout, heads, q_blocks, kv_blocks), want)


@pytest.mark.parametrize("kw, heads, q_blocks, kv_blocks", list(_sweep(seed=2)))
def test_kv_sharding_with_the_query_head_step_is_the_authors_library(kw, heads, q_blocks, kv_blocks):
    shape = {k: kw[k] for k in ("num_heads", "num_kv_heads", "block_size", "local_blocks", "vert_stride")}
    layout = layout_of(**shape, head_sliding_offset=kw["head_sliding_offset"],
                       head_sliding_step=max(1, kw["vert_stride"] // kw["num_heads"]))   # README's one line
    want = rule_mask(functools.partial(authors_library_rule, num_heads=kw["num_heads"],
                                       num_kv_heads=kw["num_kv_heads"], local_blocks=kw["local_blocks"],
                                       vert_stride=kw["vert_stride"], offset=kw["head_sliding_offset"]),
                     heads, q_blocks, kv_blocks)
    assert torch.equal(_block_mask(layout, heads, q_blocks, kv_blocks), want)


# -- the backends against float64 attention over Phi-3-small's own mask ------------------------------
@dataclasses.dataclass(frozen=True)
class Phi3Case:
    name: str
    num_heads: int              # of the whole layer
    num_kv_heads: int
    head_offset: int = 0        # a TP rank's first query head
    heads: int | None = None    # this rank's query heads (None: all)
    s_q: int = 160
    s_kv: int = 160
    q_offset: int = 0
    local_blocks: int = 2
    vert_stride: int = 8
    block_size: int = 16

    def layout(self) -> S2Layout:
        return layout_of(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, block_size=self.block_size,
                         local_blocks=self.local_blocks, vert_stride=self.vert_stride, head_sliding_offset=1,
                         head_sharding="query")

    def inputs(self, dtype):
        heads = self.heads or self.num_heads
        gen = torch.Generator().manual_seed(0)
        shapes = [(2, self.s_q, heads, 32)] + [(2, self.s_kv, heads * self.num_kv_heads // self.num_heads, 32)] * 2
        return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]

    def phi3_token_mask(self) -> torch.Tensor:
        bs, heads = self.block_size, range(self.head_offset, self.head_offset + (self.heads or self.num_heads))
        q_pos, k_pos = torch.arange(self.s_q) + self.q_offset, torch.arange(self.s_kv)
        rule = functools.partial(phi3_small_rule, num_heads=self.num_heads, local_blocks=self.local_blocks,
                                 vert_stride=self.vert_stride)
        blocks = rule_mask(rule, heads, range(-(-(self.s_q + self.q_offset) // bs)), range(-(-self.s_kv // bs)))
        return blocks[:, q_pos // bs][:, :, k_pos // bs] & (k_pos.view(1, 1, -1) <= q_pos.view(1, -1, 1))


PHI3_CASES = [
    Phi3Case("gqa4", 8, 2),
    Phi3Case("gqa8", 16, 2, local_blocks=1, s_q=144, s_kv=144),
    Phi3Case("gqa4_tp_slice", 32, 8, head_offset=8, heads=8, s_q=128, s_kv=128),   # TP rank 1 of 4
    # TP rank 1 of 8: its heads 4-7 take other residues than heads 0-3 (offset not a multiple of the stride)
    Phi3Case("gqa4_tp_slice_off_stride", 32, 8, head_offset=4, heads=4, s_q=128, s_kv=128),
    Phi3Case("gqa8_tp_slice_q_after_kv", 16, 2, head_offset=8, heads=8, s_q=64, s_kv=192, q_offset=128),
]


def assert_matches_phi3_attention(case: Phi3Case, backend: str, dtype, tol: float) -> None:
    """out, lse, dq, dk, dv of the backend (K/V grouped) equal float64 attention over Phi-3-small's
    mask with K/V repeated to every query head."""
    scale = 0.2
    q, k, v = case.inputs(dtype)

    def outputs(attend, leaves):
        leaves = [t.detach().requires_grad_() for t in leaves]
        out, lse = attend(*leaves)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
        loss = (out.double() * weights).sum() + 0.5 * torch.where(torch.isfinite(lse), lse, 0.0).double().sum()
        return (out, lse, *torch.autograd.grad(loss, leaves))

    got = outputs(lambda *t: s2_attention(*t, case.layout(), scale, head_offset=case.head_offset,
                                          q_offset=case.q_offset, return_lse=True, backend=backend), (q, k, v))
    want = outputs(lambda *t: masked_attention(*t, case.phi3_token_mask(), scale), [t.double() for t in (q, k, v)])
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol, msg=lambda m: f"{case.name} {name}: {m}")


@pytest.mark.parametrize("case", PHI3_CASES, ids=lambda c: c.name)
def test_torch_backend_is_phi3_small(case):
    assert_matches_phi3_attention(case, "torch", torch.float64, 1e-10)


def _interpreted_checks() -> dict:
    return {case.name: functools.partial(assert_matches_phi3_attention, case, "triton", torch.float32, 1e-4)
            for case in PHI3_CASES}


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    return interpreted_results(__file__, tmp_path_factory.mktemp("conformance") / "results.pt")


@pytest.mark.parametrize("check", list(_interpreted_checks()))
def test_triton_interpreted_is_phi3_small(triton_results, check):
    assert triton_results[check] == "", triton_results[check]


# -- recipes -----------------------------------------------------------------------------------------
def _s2(cfg) -> S2AttentionConfig:
    return S2AttentionConfig(**OmegaConf.to_container(cfg.attention.s2))


RECIPES = sorted(os.path.basename(p)[:-5] for p in glob.glob(f"{RECIPES_DIR}/*.yaml") if not p.endswith("base.yaml"))
WINDOW_ONLY_BASELINES = {"quality_window", "retrieval_window", "retrieval2k_window"}
"""The recipes whose heads see only their local window, on purpose."""
UNCOVERED_ON_PURPOSE = WINDOW_ONLY_BASELINES | {"retrieval2k_uncovered"}
"""The recipes that leave older blocks unseen on purpose (attention.s2.allow_uncovered_context)."""


def test_phi3_small_recipe_is_phi3_small_rule():
    cfg = compose_config(recipe="phi3_small")
    m, seq = cfg.model, cfg.train.seq_length
    s2 = _s2(cfg)
    n = seq // s2.block_size
    layout = s2.to_layout(m.num_attention_heads, m.num_query_groups)
    rule_step = max(1, s2.vert_stride // m.num_attention_heads)
    j = torch.arange(n).view(1, 1, -1)
    i = torch.arange(n).view(1, -1, 1)
    h = torch.arange(m.num_attention_heads).view(-1, 1, 1)
    phi3 = (j <= i) & ((i - j < s2.local_blocks) | ((j + h * rule_step + 1) % s2.vert_stride == 0))
    assert (m.num_attention_heads, m.num_query_groups, s2.block_size, s2.local_blocks, s2.vert_stride) == (32, 8, 64, 16, 8)
    assert torch.equal(layout.block_mask(n, n), phi3)
    assert cfg.attention.layout == "SD" * 16         # 0-indexed odd layers dense


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_covers_its_context(recipe):
    """The union over query heads of an S layer is every causal block pair at the recipe's length,
    counted from block_mask head by head; only the window-only baselines opt out, and they need to."""
    cfg = compose_config(recipe=recipe)
    m, s2, a = cfg.model, _s2(cfg), cfg.attention
    hybrid = resolve_hybrid_layout(m.num_layers, layout=a.layout, dense_every=a.dense_every,
                                   dense_layers=list(a.dense_layers) if a.dense_layers else None)
    if "S" not in hybrid:
        return
    layout = s2.to_layout(m.num_attention_heads, m.num_query_groups or m.num_attention_heads)
    n = cfg.train.seq_length // s2.block_size
    seen = torch.zeros(n, n, dtype=torch.bool)
    for h in range(layout.num_heads):
        seen |= layout.block_mask(n, n, head_offset=h, num_heads=1)[0]
    covered = torch.equal(seen, torch.ones(n, n, dtype=torch.bool).tril())
    assert s2.allow_uncovered_context == (recipe in UNCOVERED_ON_PURPOSE)
    assert covered != s2.allow_uncovered_context, (recipe, int((~seen).tril().sum()))
    validate_hybrid_model(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                          num_query_groups=m.num_query_groups, tensor_model_parallel_size=cfg.parallel.tp,
                          seq_length=cfg.train.seq_length, s2=s2, layout=hybrid,
                          context_parallel_size=cfg.parallel.cp)


@pytest.mark.parametrize("recipe", sorted(WINDOW_ONLY_BASELINES))
def test_window_only_baselines_see_only_their_window(recipe):
    """No head of a window-only baseline reaches an older block at the recipe's length (a strided
    residue inside the sequence would let some far blocks through)."""
    cfg = compose_config(recipe=recipe)
    s2 = _s2(cfg)
    layout = s2.to_layout(cfg.model.num_attention_heads, cfg.model.num_query_groups or cfg.model.num_attention_heads)
    n = cfg.train.seq_length // s2.block_size
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    assert torch.equal(layout.block_mask(n, n).any(dim=0), (j <= i) & (i - j < s2.local_blocks))


def test_the_uncovered_retrieval_recipe_leaves_the_residues_it_says():
    """retrieval2k_uncovered differs from retrieval2k_sparse only in its pattern, and beyond the
    window its heads read no block at residues 1-4 (the S2 rule written out: kv head g reads block
    j iff (j + g * step) % stride == 0)."""
    cfg, twin = compose_config(recipe="retrieval2k_uncovered"), compose_config(recipe="retrieval2k_sparse")
    assert (cfg.model, cfg.train, cfg.data, cfg.attention.layout) == (twin.model, twin.train, twin.data, twin.attention.layout)
    s2, m = _s2(cfg), cfg.model
    read = {r for r in range(s2.vert_stride) for g in range(m.num_query_groups)
            if (r + g * s2.head_sliding_step) % s2.vert_stride == 0}
    assert sorted(set(range(s2.vert_stride)) - read) == [1, 2, 3, 4]
    assert s2.to_layout(m.num_attention_heads, m.num_query_groups).unseen_block_pairs(cfg.train.seq_length) > 0


def test_uncovered_pattern_is_rejected_naming_fields_and_fixes():
    old_1p3b = dict(num_layers=2, num_attention_heads=16, num_query_groups=8, tensor_model_parallel_size=2,
                    seq_length=8192, layout="DS", context_parallel_size=4)
    with pytest.raises(ValueError) as info:
        validate_hybrid_model(**old_1p3b, s2=S2AttentionConfig(block_size=64, local_blocks=16, vert_stride=16))
    for words in ("3136 of 8256 causal block pairs", "attention.s2.vert_stride (16)", "head_sharding='kv'",
                  "16 query / 8 kv heads", "attention.s2.head_sharding=query", "attention.s2.num_dense_heads",
                  "attention.s2.allow_uncovered_context=true"):
        assert words in str(info.value), str(info.value)
    for fix in (dict(head_sharding="query"), dict(vert_stride=8), dict(num_dense_heads=1),
                dict(allow_uncovered_context=True)):
        validate_hybrid_model(**old_1p3b, s2=S2AttentionConfig(**{**dict(block_size=64, local_blocks=16,
                                                                            vert_stride=16), **fix}))
    validate_hybrid_model(**{**old_1p3b, "layout": "DD"}, s2=S2AttentionConfig(block_size=64, vert_stride=16))


def test_trainer_validate_rejects_an_uncovered_recipe():
    cpu = ["train.device=cpu", "train.precision=fp32"]
    # tiny: 4 query / 2 kv heads; stride 4 with per-kv-head sharding covers residues 0 and 2 only,
    # per query head all four.
    with pytest.raises(ValueError, match="attention.s2.head_sharding=query"):
        validate(compose_config(cpu + ["attention.s2.vert_stride=4"]), world_size=1)
    cfg = validate(compose_config(cpu + ["attention.s2.vert_stride=4", "attention.s2.head_sharding=query"]),
                   world_size=1)
    assert cfg.attention.s2.head_sharding == "query"


def test_flops_follow_the_sharding():
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_s2.flops import training_flops_per_token
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=96, use_cpu_initialization=True)
    seq, bs = 256, 16
    by = {}
    for sharding in ("kv", "query"):
        s2 = S2AttentionConfig(block_size=bs, local_blocks=1, vert_stride=3, head_sharding=sharding)
        active = s2.to_layout(4, 2).block_mask(seq // bs, seq // bs).sum().item()
        by[sharding] = (training_flops_per_token(config, "SS", s2, seq, 100).sparse, active)
    # 3 x forward, 2 S layers, 4 * head_dim FLOPs per attended key, bs * bs keys per block pair
    want = 3 * 2 * 4 * 16 * (by["query"][1] - by["kv"][1]) * bs * bs / seq
    assert by["query"][1] != by["kv"][1]
    assert by["query"][0] - by["kv"][0] == pytest.approx(want)


if __name__ == "__main__":
    run_checks(_interpreted_checks(), sys.argv[1])
