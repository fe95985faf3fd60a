"""Every kernel configuration ``tile_configs`` ships compiles ahead of time for sm_90 and sm_80
(no GPU needed): a cubin comes out and shared memory fits the architecture; for fp16 / bf16 the
dots also use tensor cores and ptxas reports no register spills on sm_90 (a few bytes tolerated on
sm_80). fp32 (IEEE dots, a correctness path) only has to fit.

Arguments are specialised as at run time for aligned tensors: pointers and strides divisible by 16
(head_dim is a power of two >= 16, so every stride of a [b, s, h, d] view is).
"""
from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

import s2attn.triton_attention as ta  # noqa: E402

SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
"""Bytes of shared memory one block may use (opt-in maximum) on H100 / A100."""
SPILL_BYTES_LIMIT = {90: 0, 80: 128}
TENSOR_CORE_OPS = re.compile(r"wgmma\.mma_async|mma\.sync")
"""Hopper's warpgroup MMA, or the Ampere-style MMA (used on sm_90 too when a tile is < 64 rows)."""
KERNELS = {"forward": ta._s2_forward_kernel, "preprocess": ta._s2_backward_preprocess_kernel,
           "backward_dq": ta._s2_backward_dq_kernel, "backward_dkdv": ta._s2_backward_dkdv_kernel}
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
FLOAT32_POINTERS = {"lse_ptr", "delta_ptr", "dlse_ptr"}
INDEX_POINTERS = {"tiles_ptr", "bounds_ptr", "pattern_ptr"}


@dataclasses.dataclass(frozen=True)
class Job:
    kernel: str
    dtype: str
    constexprs: tuple
    config: ta.KernelConfig

    @property
    def name(self) -> str:
        short = {"BLOCK_M": "m", "BLOCK_N": "n", "HEAD_DIM": "d"}
        consts = "-".join(f"{short[k]}{v}" for k, v in self.constexprs)
        return f"{self.kernel}-{self.dtype}-{consts}-w{self.config.num_warps}s{self.config.num_stages}"


def _shipped_jobs() -> list[Job]:
    """Each distinct (kernel, dtype, constexprs, warps, stages) over the supported grid, once."""
    jobs = {}
    for head_dim, block_size, dtype in itertools.product((64, 128, 256), ta.BLOCK_SIZES, DTYPES):
        configs = ta.tile_configs(head_dim, block_size, dtype)
        for field in dataclasses.fields(configs):
            config = getattr(configs, field.name)
            kernel = KERNELS[field.name]
            values = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "HEAD_DIM": head_dim}
            constexprs = tuple((p.name, values[p.name]) for p in kernel.params if p.is_constexpr)
            job = Job(field.name, DTYPES[dtype], constexprs, config)
            jobs[job.name] = job
    return sorted(jobs.values(), key=lambda j: j.name)


def _signature(kernel, dtype: str) -> dict:
    def arg_type(name: str) -> str:
        if name in FLOAT32_POINTERS:
            return "*fp32"
        if name in INDEX_POINTERS:
            return "*i32"
        if name.endswith("_ptr"):
            return f"*{dtype}"
        return "fp32" if name.endswith("scale") else "i32"
    return {p.name: "constexpr" if p.is_constexpr else arg_type(p.name) for p in kernel.params}


@pytest.fixture
def fresh_compile(tmp_path, monkeypatch):
    """A private cache, so every compile runs ptxas, and ptxas' resource report on stdout."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("job", _shipped_jobs(), ids=lambda j: j.name)
def test_shipped_config_compiles(job: Job, arch: int, fresh_compile, capfd):
    kernel = KERNELS[job.kernel]
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if p.name.endswith("_ptr") or p.name.startswith("stride_")}
    source = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, job.dtype),
                                       constexprs=dict(job.constexprs), attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": job.config.num_warps,
                                       "num_stages": job.config.num_stages})
    ptxas_log = capfd.readouterr().out

    assert compiled.asm.get("cubin"), "no cubin"
    shared = compiled.metadata.shared
    assert shared <= SHARED_MEMORY_LIMIT[arch], f"shared memory {shared} B > {SHARED_MEMORY_LIMIT[arch]} B"
    mma = sorted(set(TENSOR_CORE_OPS.findall(compiled.asm["ptx"])))
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", ptxas_log)]
    assert spills, f"no ptxas resource report captured:\n{ptxas_log}"
    if job.dtype != "fp32":
        assert mma or job.kernel == "preprocess", "dots do not use tensor cores"
        assert max(spills) <= SPILL_BYTES_LIMIT[arch], f"register spills: {max(spills)} B\n{ptxas_log}"
    print(f"{job.name} sm{arch}: shared {shared} B, spill stores {max(spills)} B, {' '.join(mma)}")
