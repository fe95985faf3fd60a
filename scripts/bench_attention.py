"""Benchmark S2 attention against dense causal SDPA and FlexAttention on the same block mask.

    python scripts/bench_attention.py --preset cpu            # issue figures on 2 CPU cores
    python scripts/bench_attention.py --preset gpu            # b=4 h=16 d=128 bf16, 32k and 64k
    python scripts/bench_attention.py --preset gpu --vert-stride 1 --methods sdpa_flash s2_triton
    python scripts/bench_attention.py --preset cpu --seq-lens 4096 --memory-seq-len 0 --repeats 1
    python scripts/bench_attention.py --preset cpu --no-flex --memory-seq-len 0 --contend   # shared CPU
    python scripts/bench_attention.py --preset cpu --methods sdpa_causal s2_torch s2_torch_packed --documents 8 --memory-seq-len 0

Methods: on a GPU, SDPA pinned to its flash and cuDNN kernels (``sdpa_flash`` is the reference of
the speed-ups), S2 Triton and torch, and compiled FlexAttention with the S2 block mask; on the CPU,
SDPA as PyTorch dispatches it (the reference), S2 torch and FlexAttention (forward only: it has no
CPU backward). A method that fails (e.g. a kernel that cannot take the shape) is recorded with its
error and the others still run; the exit status is then 1.

``--documents N`` adds ``s2_<backend>_packed``: the same tokens cut into N equal documents per
sequence, through the packed (THD, cu_seqlens) API, each document attended on its own; its
speed-up is over the reference on the unpacked sequence and its TFLOP/s count the within-document
blocks.

``--contend`` times every method beside one busy process that the script starts and stops (a
shared machine: laptop, CI runner, shared node).

Prints a table and writes JSON (every timing, density, speed-up over the reference, TFLOP/s on the
blocks each method computes), rewritten after each length so that a run stopped part way (a time
limit's SIGINT) keeps the lengths it finished, and a figure (speed-up by length, time per method at
the longest length, a forward-only method marked as such).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads: see docs/BENCHMARKS.md, "A shared CPU"

import torch
import triton

from megatron_s2.plots import plot_attention_benchmark
from s2attn import S2Layout
from s2attn.benchmark import (AttentionShape, attention_flops, competing_process, describe, device_name, flex_attention_fn,
                              packed_shape, peak_memory_bytes, s2_fn, s2_packed_fn, sdpa_causal_fn, tflops,
                              time_attention)

PRESETS = {
    "cpu": dict(shape=AttentionShape(1, 16384, 8, 8, 64, "float32", "cpu"), seq_lens=[16384],
                layout=dict(block_size=64, local_blocks=8, vert_stride=8), memory_seq_len=32768),
    "gpu": dict(shape=AttentionShape(4, 32768, 16, 16, 128, "bfloat16", "cuda"), seq_lens=[32768, 65536],
                layout=dict(block_size=64, local_blocks=8, vert_stride=16), memory_seq_len=65536),
}


def method_table(layout: S2Layout, shape: AttentionShape, documents: int | None = None) -> dict:
    """name -> (make the fn, the shape and layout its FLOPs are counted on, has a backward) for every
    method on shape.device; the first is the reference of the speed-ups. ``documents``: add the
    packed S2 methods."""
    dense, sparse = (None, shape), (layout, shape)
    if shape.device == "cuda":
        table = {f"sdpa_{b}": (lambda b=b: sdpa_causal_fn(b), dense, True) for b in ("flash", "cudnn")}
        backends = ("triton", "torch")
    else:
        table = {"sdpa_causal": (sdpa_causal_fn, dense, True)}
        backends = ("torch",)
    for backend in backends:
        table[f"s2_{backend}"] = (lambda backend=backend: s2_fn(layout, backend), sparse, True)
    table["flex_attention"] = (lambda: flex_attention_fn(layout, shape.seq_len, shape.device), sparse,
                               shape.device == "cuda")
    for backend in backends if documents else ():
        table[f"s2_{backend}_packed"] = (lambda backend=backend: s2_packed_fn(layout, backend, documents),
                                         (layout, packed_shape(shape, documents)), True)
    return table


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-lens", type=int, nargs="+", help="override the preset's sequence lengths")
    p.add_argument("--vert-stride", type=int, help="override the preset's stride (1: dense pattern)")
    p.add_argument("--methods", nargs="+", help="run only these methods (default: all on the preset's device)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    p.add_argument("--documents", type=int, help="also time S2 on each sequence cut into this many equal documents")
    p.add_argument("--contend", action="store_true", help="time beside one busy process (started and stopped here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-seq-len", type=int, help="peak memory of one S2 fwd+bwd at this length (0: skip)")
    p.add_argument("--json", type=Path, default=Path("runs/bench_attention.json"))
    p.add_argument("--figure", default="runs/bench_attention.png", help="PNG output path ('' for none)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    try:
        args.layout = S2Layout(preset["shape"].heads, preset["shape"].kv_heads,
                               **preset["layout"] | ({"vert_stride": args.vert_stride} if args.vert_stride is not None else {}))
    except ValueError as error:
        p.error(f"--vert-stride {args.vert_stride}: {error}")
    for n in args.seq_lens or preset["seq_lens"]:
        if args.documents is not None and (args.documents < 1 or n % args.documents):
            p.error(f"--documents {args.documents}: must be >= 1 and divide every sequence length ({n})")
    available = list(method_table(args.layout, preset["shape"], args.documents or 1))
    for name in args.methods or []:
        if name not in available:
            p.error(f"--methods {name}: not available with --preset {args.preset} (available: {' '.join(available)})")
        if name.endswith("_packed") and not args.documents:
            p.error(f"--methods {name}: needs --documents N")
    default = list(method_table(args.layout, preset["shape"], args.documents))
    args.methods = [m for m in args.methods or default if not (args.no_flex and m == "flex_attention")]
    for name, value in (("--repeats", args.repeats), *(("--seq-lens", n) for n in args.seq_lens or [])):
        if value < 1:
            p.error(f"{name} {value}: must be >= 1")
    return args


def _row(seq_len: int, name: str, timing: dict) -> str:
    ms = lambda key: f"{timing[key] * 1e3:9.1f}" if key in timing else f"{'-':>9}"
    ratio = lambda key: f"{timing[key]:10.2f}" if key in timing else f"{'-':>10}"
    tf = timing.get("tflops_fwd_bwd", timing.get("tflops_fwd"))
    return (f"{seq_len:>7} {name:<16} {ms('forward_s')} {ms('backward_s')} {ms('fwd_bwd_s')} "
            f"{ratio('speedup_fwd_bwd_vs_sdpa')} {ratio('speedup_fwd_vs_sdpa')} {tf:8.3f}")


def _write(path: Path, report: dict) -> None:
    """The report so far, replacing the file whole (written beside it, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    base, layout = preset["shape"], args.layout
    reference = next(iter(method_table(layout, base)))
    report = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
                          "platform": platform.platform(), "threads": torch.get_num_threads(),
                          "device": device_name(base.device), "load_average": os.getloadavg()},
              "reference": reference, "contend": args.contend, "runs": []}
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f"{', beside one busy process (--contend)' if args.contend else ''}")
    print(f"{'seq':>7} {'method':<16} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'x ref f+b':>10} {'x ref fwd':>10} "
          f"{'TFLOP/s':>8}   (ref: {reference})")
    failed = False
    with competing_process() if args.contend else contextlib.nullcontext():   # --contend: a shared CPU
        for seq_len in args.seq_lens or preset["seq_lens"]:
            shape = replace(base, seq_len=seq_len)
            table = method_table(layout, shape, args.documents)
            flops = {name: attention_flops(*counted) for name, (_, counted, _) in table.items()}
            flops_sparse, flops_dense = attention_flops(layout, shape), attention_flops(None, shape)
            print(f"# seq {seq_len}: density {layout.density(seq_len):.3f}, "
                  f"{flops_dense[0] / flops_sparse[0]:.2f}x fewer forward FLOPs than dense causal")
            if any(name.endswith("_packed") for name in args.methods):
                packed = attention_flops(layout, packed_shape(shape, args.documents))
                print(f"# packed: {args.documents} documents of {seq_len // args.documents} tokens, "
                      f"{flops_sparse[0] / packed[0]:.2f}x fewer forward FLOPs than the unpacked S2")
            results, errors = {}, {}
            for name in args.methods:
                make, _, has_backward = table[name]
                try:
                    timing = time_attention(make(), shape, args.repeats, backward=has_backward)
                except Exception as error:          # one method's failure (no kernel, OOM, compile) is a result
                    errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    print(f"{seq_len:>7} {name:<16} FAILED {errors[name]}")
                    if shape.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                fwd_flops, bwd_flops = flops[name]
                timing["tflops_fwd_bwd" if has_backward else "tflops_fwd"] = tflops(
                    fwd_flops + (bwd_flops if has_backward else 0), timing["fwd_bwd_s" if has_backward else "forward_s"])
                results[name] = timing
            for name, timing in results.items():
                if reference in results:
                    ref = results[reference]
                    timing["speedup_fwd_vs_sdpa"] = ref["forward_s"] / timing["forward_s"]
                    if "fwd_bwd_s" in timing:
                        timing["speedup_fwd_bwd_vs_sdpa"] = ref["fwd_bwd_s"] / timing["fwd_bwd_s"]
                print(_row(seq_len, name, timing))
            report["runs"].append(describe(layout, shape) | {"results": results, "errors": errors})
            failed |= bool(errors)
            _write(args.json, report)
    memory_seq = preset["memory_seq_len"] if args.memory_seq_len is None else args.memory_seq_len
    if memory_seq:
        backend = "triton" if base.device == "cuda" else "torch"
        peak = peak_memory_bytes(layout, backend, replace(base, seq_len=memory_seq))
        report["peak_memory"] = {"seq_len": memory_seq, "backend": backend, "bytes": peak}
        print(f"# peak memory of one s2_{backend} forward+backward at seq {memory_seq}: {peak / 2**20:.0f} MiB")
        _write(args.json, report)
    print(f"# wrote {args.json}")
    if args.figure:
        if any(run["results"] for run in report["runs"]):
            print(f"# wrote {plot_attention_benchmark(args.figure, report)}")
        else:
            print("# no figure: no method ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
