"""Hybrid (DSSS) vs dense (DDDD) forward+backward step time and peak memory, with the speed-up
the FLOPs model predicts. Prints a table and writes JSON.

    python scripts/bench_hybrid_step.py --out bench_hybrid_step.json
"""
import argparse
import json

from megatron_s2 import S2AttentionConfig
from megatron_s2.benchmark import HybridStepBenchmark, format_table, run_benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["DDDD", "DSSS"], help="the first is the baseline")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=8)
    p.add_argument("--vert-stride", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per layout, alternating")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench_hybrid_step.json", help="JSON output path")
    a = p.parse_args()
    bench = HybridStepBenchmark(
        layouts=tuple(a.layouts), hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups, vocab_size=a.vocab_size, seq_length=a.seq_length,
        micro_batch_size=a.micro_batch_size,
        s2=S2AttentionConfig(block_size=a.block_size, local_blocks=a.local_blocks, vert_stride=a.vert_stride),
        warmup_steps=a.warmup_steps, steps=a.steps, rounds=a.rounds, device=a.device)
    result = run_benchmark(bench)
    print(format_table(result))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
