"""Every kernel configuration ``tile_configs`` ships compiles ahead of time for sm_90 and sm_80
(no GPU needed): a cubin comes out and shared memory fits the architecture; for fp16 / bf16 the
dots also use tensor cores and ptxas reports no register spills on sm_90 (a few bytes tolerated on
sm_80). fp32 (IEEE dots, a correctness path) only has to fit.

Arguments are specialised as Triton's JIT specialises them at launch, by Triton's own function
(``native_specialize_impl``, the same in 3.6 and 3.9): an integer equal to 1 becomes a constant, a
multiple of 16 (0 included) carries ``tt.divisibility=16``, one beyond 32 bits becomes int64;
pointers from torch's allocator are 16-byte aligned. The argument *values* come from a profile:

- ``launch``: the GPU benchmark's call (b=4, s=32768, 16 heads, MHA, block 64, stride 16,
  contiguous [b, s, h, d] tensors; lse-like [b, h, s] tensors with a unit last stride), for every
  shipped configuration: head dims 16..256, block sizes 16..128, fp16 / bf16 / fp32.
- ``ones``, ``ragged``, ``wide``: every integer 1 (a constant: one head, MQA, s=1, stride 1);
  none special (lengths and head counts off the multiples of 16); batch and sequence strides of
  2**32 elements (int64). For the fp16 / bf16 configurations of head dim 128 and block 64.
  ``ones`` is a degenerate launch (one token, unit strides) that only has to compile and fit: the
  dK/dV kernel's dots come out without tensor-core instructions there.

Every kernel with a ``VARLEN`` switch (packed documents) is compiled both ways, in every profile:
with it, its ``items`` and ``cu_seqlens`` pointers are int32 tensors; without, they are None, which
the JIT makes a constant, as the launch passes them.

Values are chosen by argument name (``*_ptr`` pointers, ``stride_<tensor><dim>``, ``*scale``
floats, other names integers), so a renamed or added argument still gets a type.

Under triton 3.6 (the GPU machine's): ``scripts/compile_check_triton36.sh``.
"""
from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch

triton = pytest.importorskip("triton")
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

import s2attn.triton_attention as ta  # noqa: E402

SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
"""Bytes of shared memory one block may use (opt-in maximum) on H100 / A100."""
SPILL_BYTES_LIMIT = {90: 0, 80: 128}
TENSOR_CORE_OPS = re.compile(r"wgmma\.mma_async|mma\.sync")
"""Hopper's warpgroup MMA, or the Ampere-style MMA (used on sm_90 too when a tile is < 64 rows)."""
KERNELS = {"forward": ta._s2_forward_kernel, "preprocess": ta._s2_backward_preprocess_kernel,
           "backward_dq": ta._s2_backward_dq_kernel, "backward_dkdv": ta._s2_backward_dkdv_kernel,
           "backward_dkdv_reduce": ta._s2_backward_dkdv_reduce_kernel}
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
FLOAT32_POINTERS = {"lse_ptr", "delta_ptr", "dlse_ptr", "partial_ptr"}
PACK_POINTERS = {"items_ptr", "cu_seqlens_q_ptr", "cu_seqlens_kv_ptr"}
"""int32 tensors with VARLEN, None without."""
INDEX_POINTERS = {"tiles_ptr", "bounds_ptr", "pattern_ptr", "chunks_ptr", "reduce_ptr", *PACK_POINTERS}
KV_SHAPED, LSE_SHAPED = {"k", "v", "dk", "dv"}, {"dl"}
"""Tensors of ``stride_<tensor><dim>`` shaped [b, s, kv_heads, d] and float32 [b, h, s]; the
others are [b, s, heads, d]."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """Integer argument values of one launch (see the module docstring); ``ones``: every one is 1."""

    seq: int
    heads: int
    kv_heads: int
    head_phase: int
    block_size: int
    vert_stride: int
    offset: int
    wide_strides: bool = False
    ones: bool = False

    def value(self, name: str, head_dim: int) -> int | float:
        if name.endswith("scale"):
            return 0.08838834764831845
        if self.ones:
            return 1
        if name.startswith("stride_"):
            tensor, dim = name[len("stride_"):-1], name[-1]
            if self.wide_strides and dim in "bs":
                return 2**32
            if tensor in LSE_SHAPED:
                return {"b": self.heads * self.seq, "h": self.seq, "s": 1}[dim]
            heads = self.kv_heads if tensor in KV_SHAPED else self.heads
            return {"b": self.seq * heads * head_dim, "s": heads * head_dim, "h": head_dim}[dim]
        return {"num_heads": self.heads, "num_kv_heads": self.kv_heads, "head_phase": self.head_phase,
                "group_size": self.heads // self.kv_heads, "block_size": self.block_size,
                "vert_stride": self.vert_stride, "q_offset": self.offset, "kv_offset": self.offset,
                }.get(name, self.seq)                  # seqlen_q, seqlen_k, and any new integer


LAUNCH = Profile(seq=32768, heads=16, kv_heads=16, head_phase=0, block_size=64, vert_stride=16, offset=0)
PROFILES = {
    "ones": dataclasses.replace(LAUNCH, ones=True),
    "ragged": Profile(seq=1000, heads=12, kv_heads=4, head_phase=2, block_size=64, vert_stride=3, offset=192),
    "wide": dataclasses.replace(LAUNCH, wide_strides=True),
}
SPECIALISED_CONFIG = dict(head_dim=128, block_size=64)
"""The configuration the other profiles compile (the GPU benchmark's)."""


@dataclasses.dataclass(frozen=True)
class Job:
    kernel: str
    dtype: str
    head_dim: int
    constexprs: tuple
    config: ta.KernelConfig
    profile: str

    @property
    def name(self) -> str:
        short = {"BLOCK_M": "m", "BLOCK_N": "n", "HEAD_DIM": "d", "VARLEN": "varlen"}
        consts = "-".join(f"{short[k]}{'' if k == 'VARLEN' else v}" for k, v in self.constexprs
                          if k != "VARLEN" or v)
        return (f"{self.kernel}-{self.dtype}-{consts}-w{self.config.num_warps}s{self.config.num_stages}"
                f"-{self.profile}")


def _jobs() -> list[Job]:
    """Each distinct (kernel, dtype, constexprs, warps, stages) over the supported grid with the
    launch profile, and the other profiles for SPECIALISED_CONFIG in fp16 / bf16, once each;
    VARLEN both ways where a kernel has it."""
    jobs = {}
    for head_dim, block_size, dtype in itertools.product(ta.HEAD_DIMS, ta.BLOCK_SIZES, DTYPES):
        specialised = dict(head_dim=head_dim, block_size=block_size) == SPECIALISED_CONFIG and dtype != torch.float32
        configs = ta.tile_configs(head_dim, block_size, dtype)
        for field in dataclasses.fields(configs):
            config = getattr(configs, field.name)
            kernel = KERNELS[field.name]
            for varlen in (False, True):
                values = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "HEAD_DIM": head_dim,
                          "VARLEN": varlen}
                constexprs = tuple((p.name, values[p.name]) for p in kernel.params if p.is_constexpr)
                for profile in ["launch", *(PROFILES if specialised else [])]:
                    job = Job(field.name, DTYPES[dtype], head_dim, constexprs, config, profile)
                    jobs[job.name] = job
    return sorted(jobs.values(), key=lambda j: j.name)


def _specialise(job: Job) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compile, as the JIT derives them at launch."""
    profile = LAUNCH if job.profile == "launch" else PROFILES[job.profile]
    signature, constexprs, attrs = {}, dict(job.constexprs), {}
    for i, p in enumerate(KERNELS[job.kernel].params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            continue
        if p.name in PACK_POINTERS and not constexprs["VARLEN"]:
            kind, attr = native_specialize_impl(CUDABackend, None, False, True, True)
            assert kind == "constexpr"
            constexprs[p.name] = attr
        elif p.name.endswith("_ptr"):
            element = "fp32" if p.name in FLOAT32_POINTERS else "i32" if p.name in INDEX_POINTERS else job.dtype
            kind, attr = f"*{element}", "D"                         # torch allocations: 16-byte aligned
        else:
            value = profile.value(p.name, job.head_dim)
            kind, attr = native_specialize_impl(CUDABackend, value, False, not p.do_not_specialize,
                                                not p.do_not_specialize_on_alignment)
            if kind == "constexpr":
                constexprs[p.name] = attr
        signature[p.name] = kind
        if kind != "constexpr" and attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs


@pytest.fixture
def fresh_compile(tmp_path, monkeypatch):
    """A private cache, so every compile runs ptxas, and ptxas' resource report on stdout."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")


def test_profiles_reach_every_specialisation():
    """Over the jobs, some integer argument is a constant 1, some is divisible by 16, some is a
    plain i32, and some is int64: the JIT's four integer cases are all compiled."""
    seen = set()
    for job in _jobs():
        signature, constexprs, attrs = _specialise(job)
        params = KERNELS[job.kernel].params
        for i, p in enumerate(params):
            if p.is_constexpr or p.name.endswith("_ptr") or p.name.endswith("scale"):
                continue
            if p.name in constexprs:
                seen.add("one")
            else:
                seen.add(f"{signature[p.name]}{'-div16' if (i,) in attrs else ''}")
    assert {"one", "i32-div16", "i32", "i64-div16"} <= seen, seen


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("job", _jobs(), ids=lambda j: j.name)
def test_shipped_config_compiles(job: Job, arch: int, fresh_compile, capfd):
    signature, constexprs, attrs = _specialise(job)
    source = triton.compiler.ASTSource(fn=KERNELS[job.kernel], signature=signature, constexprs=constexprs,
                                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": job.config.num_warps, "num_stages": job.config.num_stages})
    ptxas_log = capfd.readouterr().out

    assert compiled.asm.get("cubin"), "no cubin"
    shared = compiled.metadata.shared
    assert shared <= SHARED_MEMORY_LIMIT[arch], f"shared memory {shared} B > {SHARED_MEMORY_LIMIT[arch]} B"
    mma = sorted(set(TENSOR_CORE_OPS.findall(compiled.asm["ptx"])))
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", ptxas_log)]
    assert spills, f"no ptxas resource report captured:\n{ptxas_log}"
    if job.dtype != "fp32" and job.profile != "ones":
        assert mma or job.kernel in ("preprocess", "backward_dkdv_reduce"), "dots do not use tensor cores"
        assert max(spills) <= SPILL_BYTES_LIMIT[arch], f"register spills: {max(spills)} B\n{ptxas_log}"
    print(f"{job.name} sm{arch}: shared {shared} B, spill stores {max(spills)} B, {' '.join(mma)}")
