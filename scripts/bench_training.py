"""Training step speed of all-dense, hybrid and all-sparse layouts of one model at several
sequence lengths, side by side: tokens/s, step time, peak memory, TFLOP/s, MFU, and the speed-up
over the first layout next to the FLOPs model's prediction. Every (layout, length) runs in fresh
processes, alternating between layouts (see megatron_s2.benchmark). fp32 on CPU, bf16 on CUDA.
Prints a table, writes JSON and a figure. Bad arguments exit with status 2 before any model is
built.

    python scripts/bench_training.py                                   # CPU: tiny model, 4k/8k/16k
    python scripts/bench_training.py --layouts DDDD DSSS --seq-lengths 8192 --steps 3 --rounds 3
    # The llama_1p3b_32k shape (recipes/llama_1p3b_32k.yaml) with 8 of its 24 layers, one GPU:
    python scripts/bench_training.py --device cuda --seq-lengths 32768 --hidden-size 2048 \
        --num-attention-heads 16 --num-query-groups 8 --ffn-hidden-size 5632 --swiglu \
        --block-size 64 --local-blocks 16 --vert-stride 16 --s2 head_sharding=query \
        --layouts DDDDDDDD DSSSDSSS --rounds 1 --steps 3
"""
import argparse
import ast
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads: see docs/BENCHMARKS.md, "A shared CPU"

from megatron_s2.accelerators import quiet_fallback_notices

quiet_fallback_notices()    # before Megatron is imported, here and in the spawned step processes

from megatron_s2 import S2AttentionConfig  # noqa: E402
from megatron_s2.benchmark import HybridStepBenchmark, format_sweep_table, run_benchmark, sweep  # noqa: E402
from megatron_s2.plots import plot_speedups  # noqa: E402


def s2_setting(text: str) -> tuple[str, object]:
    """KEY=VALUE for another S2AttentionConfig field; VALUE a Python literal or a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--s2 takes KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def peak_tflops(device: str, given: float | None) -> float | None:
    """--peak-tflops, else on CUDA the device's dense bf16 peak from the trainer's table."""
    if given is not None or device != "cuda":
        return given
    from megatron_s2.training.metrics import peak_tflops_per_device
    return peak_tflops_per_device(None)


def parse(argv=None) -> tuple[argparse.Namespace, list[HybridStepBenchmark]]:
    """The arguments and the checked benchmark of each sequence length; exit status 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["DDDD", "DSSS", "SSSS"], help="the first is the baseline")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP width (default 4 * hidden size)")
    p.add_argument("--swiglu", action="store_true", help="gated SiLU MLP (Llama); GELU otherwise")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=8)
    p.add_argument("--vert-stride", type=int, default=8)
    p.add_argument("--s2", type=s2_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="another S2AttentionConfig field, e.g. head_sharding=query (repeatable)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per layout, alternating")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak TFLOP/s of one device, for MFU (default: known GPUs by name)")
    p.add_argument("--out", default="runs/bench_training.json", help="JSON output path")
    p.add_argument("--figure", default="runs/bench_training.png", help="PNG output path ('' for none)")
    a = p.parse_args(argv)
    try:
        s2 = S2AttentionConfig(block_size=a.block_size, local_blocks=a.local_blocks, vert_stride=a.vert_stride,
                               **dict(a.s2))
        benches = sweep(HybridStepBenchmark(
            layouts=tuple(a.layouts), hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
            num_query_groups=a.num_query_groups, ffn_hidden_size=a.ffn_hidden_size, swiglu=a.swiglu,
            vocab_size=a.vocab_size, seq_length=a.seq_lengths[0], micro_batch_size=a.micro_batch_size, s2=s2,
            warmup_steps=a.warmup_steps, steps=a.steps, rounds=a.rounds, device=a.device,
            peak_tflops=peak_tflops(a.device, a.peak_tflops)), a.seq_lengths)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    return a, benches


def main(argv=None) -> None:
    a, benches = parse(argv)
    results = [run_benchmark(bench) for bench in benches]
    print(format_sweep_table(results))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {a.out}")
    if a.figure:
        print(f"wrote {plot_speedups(a.figure, results)}")


if __name__ == "__main__":
    main()
