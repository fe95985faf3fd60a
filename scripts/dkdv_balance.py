"""Balance of the Triton backward's dK/dV programs before and after splitting long visit lists,
read from the sparse index (no GPU): one TP rank's heads of a recipe, one sequence per length.

    python scripts/dkdv_balance.py                                  # 1.3B and 7B recipes, 32k-128k
    python scripts/dkdv_balance.py --recipes llama_7b_128k --seq-lens 131072 --tp-rank 3

Prints, per (recipe, length): the chunk bound, programs, heaviest / mean visited query tiles per
program before and after (goal: after <= 2), and the modelled dK/dV and backward times
(``s2attn.dkdv_balance`` states the model and its assumptions).
"""
from __future__ import annotations

import argparse
import sys
import warnings

from omegaconf import OmegaConf

from megatron_s2.config import S2AttentionConfig
from megatron_s2.training.config import compose_config
from s2attn.dkdv_balance import dkdv_balance


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["llama_1p3b_32k", "llama_7b_128k"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--tp-rank", type=int, default=0, help="which TP rank's heads (default 0)")
    args = p.parse_args(argv)
    for n in args.seq_lens:
        if n < 1:
            p.error(f"--seq-lens {n}: must be >= 1")
    print(f"{'recipe':<16} {'seq':>7} {'tp':>3} {'bound':>6} {'programs':>17} {'heaviest/mean before':>21} "
          f"{'after':>12} {'dK/dV ms':>15} {'reduce ms':>9} {'bwd x':>6}")
    for recipe in args.recipes:
        cfg = compose_config(recipe=recipe)
        model, tp = cfg.model, cfg.parallel.tp
        if not 0 <= args.tp_rank < tp:
            p.error(f"--tp-rank {args.tp_rank}: {recipe} has tp {tp}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layout = S2AttentionConfig(**OmegaConf.to_container(cfg.attention.s2)).to_layout(
                model.num_attention_heads, model.num_query_groups)
        heads = model.num_attention_heads // tp
        for seq_len in args.seq_lens:
            r = dkdv_balance(layout, seq_len, args.tp_rank * heads, heads, model.hidden_size // model.num_attention_heads)
            b, a = r["before"], r["after"]
            print(f"{recipe:<16} {seq_len:>7} {tp:>3} {r['chunk_bound']:>6} {b['programs']:>7} -> {a['programs']:>7} "
                  f"{b['heaviest']:>6}/{b['mean']:<6.0f}={b['ratio']:5.1f} {a['heaviest']:>4}/{a['mean']:<4.0f}={a['ratio']:3.1f} "
                  f"{b['dkdv_ms']:6.2f}->{a['dkdv_ms']:6.2f} {a['reduce_ms']:9.3f} {r['backward_ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
