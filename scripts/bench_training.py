"""Training step speed of all-dense, hybrid and all-sparse layouts of one model at several
sequence lengths, side by side: tokens/s, step time, peak memory, and the speed-up over the first
layout next to the FLOPs model's prediction. Every (layout, length) runs in fresh processes,
alternating between layouts (see megatron_s2.benchmark). Prints a table, writes JSON and a figure.

    python scripts/bench_training.py                                   # CPU: tiny model, 4k/8k/16k
    python scripts/bench_training.py --layouts DDDD DSSS --seq-lengths 8192 --steps 3 --rounds 3
    python scripts/bench_training.py --device cuda --seq-lengths 8192 32768 --hidden-size 2048 \
        --num-attention-heads 16 --layouts DDDDDDDD DSSSDSSS SSSSSSSS
"""
import argparse
import json

from megatron_s2 import S2AttentionConfig
from megatron_s2.benchmark import HybridStepBenchmark, format_sweep_table, run_sweep
from megatron_s2.evaluation.plots import plot_speedups


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["DDDD", "DSSS", "SSSS"], help="the first is the baseline")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=8)
    p.add_argument("--vert-stride", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per layout, alternating")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench_training.json", help="JSON output path")
    p.add_argument("--figure", default="bench_training.png", help="PNG output path ('' for none)")
    a = p.parse_args(argv)
    bench = HybridStepBenchmark(
        layouts=tuple(a.layouts), hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups, vocab_size=a.vocab_size, seq_length=a.seq_lengths[0],
        micro_batch_size=a.micro_batch_size,
        s2=S2AttentionConfig(block_size=a.block_size, local_blocks=a.local_blocks, vert_stride=a.vert_stride),
        warmup_steps=a.warmup_steps, steps=a.steps, rounds=a.rounds, device=a.device)
    results = run_sweep(bench, a.seq_lengths)
    print(format_sweep_table(results))
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {a.out}")
    if a.figure:
        print(f"wrote {plot_speedups(a.figure, results)}")


if __name__ == "__main__":
    main()
