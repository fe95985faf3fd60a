"""Picture of a recipe's attention pattern: the S2 block mask per head (one per kv group), the
union over heads (do they cover the whole context?), and the layer-by-layer S/D layout with
densities.

    python scripts/plot_layout.py                          # the tiny recipe -> runs/layouts/tiny.png
    python scripts/plot_layout.py --recipe phi3_small --out docs/figures/layout_phi3_small.png
    python scripts/plot_layout.py --recipe tiny attention.layout=DSSS attention.s2.vert_stride=4
"""
import argparse
import os

from megatron_s2.accelerators import quiet_fallback_notices

quiet_fallback_notices()        # before Megatron is imported

from omegaconf import OmegaConf  # noqa: E402

from megatron_s2 import S2AttentionConfig, resolve_hybrid_layout  # noqa: E402
from megatron_s2.plots import plot_layout  # noqa: E402
from megatron_s2.training.config import compose_config  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny", help="a recipe name in recipes/")
    p.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. attention.layout=DSSS")
    p.add_argument("--seq-length", type=int, default=None, help="default: the recipe's train.seq_length")
    p.add_argument("--max-blocks", type=int, default=64, help="blocks shown in the mask pictures")
    p.add_argument("--out", default=None, help="PNG path (default: runs/layouts/<recipe>.png)")
    a = p.parse_args(argv)
    # Only the model and attention fields matter here: the recipe is read, not validated for a
    # machine (a GPU recipe draws on a CPU-only machine too).
    cfg = compose_config(a.overrides, recipe=a.recipe)
    m, att = cfg.model, cfg.attention
    layout = resolve_hybrid_layout(m.num_layers, layout=att.layout, dense_every=att.dense_every,
                                   dense_layers=OmegaConf.to_container(att.dense_layers) if att.dense_layers else None)
    out = a.out or os.path.join("runs", "layouts", f"{a.recipe}.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    info = plot_layout(out, s2=S2AttentionConfig(**OmegaConf.to_container(att.s2)),
                       num_heads=m.num_attention_heads,
                       num_kv_heads=m.num_query_groups or m.num_attention_heads, layout=layout,
                       seq_length=a.seq_length or cfg.train.seq_length, max_blocks=a.max_blocks)
    print(f"layout {layout}: densities {', '.join(f'{d:.3f}' for d in info['densities'])}; "
          f"heads cover {info['coverage']:.1%} of causal block pairs")
    print(f"wrote {info['path']}")


if __name__ == "__main__":
    main()
