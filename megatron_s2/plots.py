"""Every figure of the project, drawn with matplotlib's object API (no pyplot, no global state).
The trainer draws the layout picture of each run with it; evaluation scripts draw the rest.

- ``plot_layout``: the S2 block mask of each head with its own pattern (four per row), the union over
  heads (how many heads compute each block pair, and whether together they cover the whole
  causal context), and the layer-by-layer S/D layout with each layer's density.
- ``plot_speedups``: measured vs FLOPs-predicted speed-up over the baseline layout by sequence
  length, and tokens/s per layout (from ``megatron_s2.benchmark.run_sweep``).
- ``plot_attention_benchmark``: speed-up of each attention method over dense causal SDPA by
  sequence length, and forward/backward time per method at the longest length, a forward-only
  method marked, under a title with the shape, dtype and block pattern (from
  ``scripts/bench_attention.py``'s report).
- ``plot_loss_curves``: training and validation loss of several runs side by side.
- ``plot_needles`` and ``plot_recall_by_distance``: long-range retrieval of several models (from
  ``megatron_s2.evaluation.retrieval``), as the S2 paper's needle picture and as lines by distance.

Figures are small PNGs (blocky images, low dpi) meant for docs and wandb.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .config import DENSE, S2AttentionConfig, check_layout

SPARSE_COLOR, DENSE_COLOR = "#4c72b0", "#dd8452"
PALETTE = ["#555555", SPARSE_COLOR, "#55a868", "#c44e52", "#8172b2"]     # one colour per line


def _viridis(n: int) -> np.ndarray:
    """n colours of viridis, one per count."""
    return colormaps["viridis"](np.linspace(0.15, 1.0, n))


def _save(fig: Figure, path: str, dpi: int) -> str:
    FigureCanvasAgg(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def layer_densities(layout: str, s2: S2AttentionConfig, num_heads: int, num_kv_heads: int,
                    seq_length: int) -> list[float]:
    """Fraction of causal block pairs each layer computes: 1 for D layers, the S2 density for S."""
    check_layout(layout, len(layout))
    sparse = s2.to_layout(num_heads, num_kv_heads).density(seq_length)
    return [1.0 if kind == DENSE else sparse for kind in layout]


def pattern_heads(s2: S2AttentionConfig, num_heads: int, num_kv_heads: int) -> tuple[list[int], str]:
    """The query heads with a pattern of their own and what they stand for: every query head under
    ``head_sharding="query"``; the first head of each kv group under ``"kv"`` (its group shares it)."""
    layout = s2.to_layout(num_heads, num_kv_heads)
    if s2.head_sharding == "query":
        return list(range(num_heads)), "heads"
    return [g * layout.group_size for g in range(num_kv_heads)], "kv groups"


def head_coverage(s2: S2AttentionConfig, num_heads: int, num_kv_heads: int, num_blocks: int) -> torch.Tensor:
    """int [num_blocks, num_blocks]: how many of ``pattern_heads`` compute each block pair (0 above
    the diagonal)."""
    layout = s2.to_layout(num_heads, num_kv_heads)
    count = torch.zeros(num_blocks, num_blocks, dtype=torch.int32)
    for h in pattern_heads(s2, num_heads, num_kv_heads)[0]:     # one mask at a time: memory stays small
        count += layout.block_mask(num_blocks, num_blocks, head_offset=h, num_heads=1)[0]
    return count


def plot_layout(path: str, *, s2: S2AttentionConfig, num_heads: int, num_kv_heads: int, layout: str,
                seq_length: int, max_blocks: int = 64, max_groups: int = 8, title: str | None = None,
                dpi: int = 80) -> dict:
    """Draw the attention pattern of a hybrid model to ``path`` (PNG).

    Top: the block mask of each of ``pattern_heads`` (up to ``max_groups``, four per row) over the
    first blocks that show the pattern whole (the local window and three strides, at least 16).
    Bottom: how many kv groups compute each block pair over the first ``max_blocks`` blocks (red:
    a causal pair no head computes), and each layer's density. Ticks are whole block and layer
    numbers. The coverage and the densities are computed at the full ``seq_length``.
    Returns {"path", "densities", "coverage"}: coverage is the fraction of causal block pairs that
    at least one head of an S layer computes.
    """
    if seq_length < 1 or seq_length % s2.block_size:
        raise ValueError(f"seq_length ({seq_length}) must be a positive multiple of s2.block_size "
                         f"({s2.block_size})")
    if max_blocks < 1 or max_groups < 1:
        raise ValueError(f"max_blocks ({max_blocks}) and max_groups ({max_groups}) must be >= 1")
    densities = layer_densities(layout, s2, num_heads, num_kv_heads, seq_length)
    n = seq_length // s2.block_size
    count_full = head_coverage(s2, num_heads, num_kv_heads, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    coverage = (count_full[causal] > 0).float().mean().item()
    shown = min(n, max_blocks)
    count = count_full[:shown, :shown].numpy()
    s2_layout = s2.to_layout(num_heads, num_kv_heads)
    heads, unit = pattern_heads(s2, num_heads, num_kv_heads)
    groups = heads[:max_groups]
    mask_blocks = min(n, max_blocks, max(16, s2.local_blocks + 3 * s2.vert_stride))
    per_row = min(4, len(groups))
    rows = -(-len(groups) // per_row)

    fig = Figure(figsize=(10.0, 2.6 * rows + 4.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.6 * rows, 4.4])
    binary = ListedColormap(["#f2f2f2", SPARSE_COLOR])
    axes = np.atleast_2d(top.subplots(rows, per_row, squeeze=False))
    for k, ax in enumerate(axes.flat):
        if k >= len(groups):
            ax.set_axis_off()
            continue
        first = groups[k]
        mask = s2_layout.block_mask(mask_blocks, mask_blocks, head_offset=first, num_heads=1)[0]
        ax.imshow(mask.numpy(), cmap=binary, interpolation="nearest", vmin=0, vmax=1)
        last = first if unit == "heads" else first + s2_layout.group_size - 1
        name = f"head {first}" if last == first else f"heads {first}-{last}"
        dense = s2_layout.is_dense_kv_head(first // s2_layout.group_size)
        ax.set_title(name + (" (dense)" if dense else ""), fontsize=9)
        _block_axes(ax, labels=k == 0)
    top.suptitle(f"block mask of the first {len(groups)} of {len(heads)} {unit} (blocks 0-{mask_blocks - 1} "
                 f"of {n})", fontsize=9)

    ax, bars = bottom.subplots(1, 2, width_ratios=[1, 1.2])
    # Above the diagonal is blank; a causal block that no head computes shows red.
    masked = np.ma.masked_where(~np.tri(shown, dtype=bool), count)
    cmap = ListedColormap(_viridis(len(heads))).with_extremes(under="#d62728", bad="white")
    image = ax.imshow(masked, cmap=cmap, interpolation="nearest", vmin=0.5, vmax=len(heads) + 0.5)
    bar = bottom.colorbar(image, ax=ax, extend="min")
    bar.set_ticks(_count_ticks(len(heads)))
    bar.set_label(f"{unit} computing the block (red: none)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(f"union over heads, first {shown} blocks: {coverage:.0%} of causal blocks covered", fontsize=9)
    _block_axes(ax, labels=True)

    ax = bars
    colors = [DENSE_COLOR if kind == DENSE else SPARSE_COLOR for kind in layout]
    ax.bar(range(len(layout)), densities, color=colors)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("fraction of causal blocks computed", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.set_title(f"layout {layout if len(layout) <= 16 else layout[:16] + '...'} "
                 f"(orange D, blue S); S density {min(densities):.2f}", fontsize=9)
    if len(layout) <= 16:
        for i, (kind, d) in enumerate(zip(layout, densities)):
            ax.text(i, d + 0.02, f"{kind}\n{d:.2f}", ha="center", fontsize=7)
    ax.tick_params(labelsize=7)
    fig.suptitle(title or (f"S2 pattern at seq {seq_length}: block {s2.block_size}, local "
                           f"{s2.local_blocks} blocks, stride {s2.vert_stride}; {num_heads} heads / "
                           f"{num_kv_heads} kv groups"), fontsize=10)
    return {"path": _save(fig, path, dpi), "densities": densities, "coverage": coverage}


def _count_ticks(n: int) -> list[int]:
    """Ticks of a colour scale whose colours are the whole counts 1..n: each count up to 8, else
    1, n and round counts between."""
    if n <= 8:
        return list(range(1, n + 1))
    return sorted({1, n} | {int(t) for t in MaxNLocator(nbins=8, integer=True).tick_values(1, n) if 1 < t < n})


def _block_axes(ax, labels: bool) -> None:
    """Whole-number block ticks; axis names only where ``labels``."""
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.tick_params(labelsize=7)
    if labels:
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_xlabel("sequence length", fontsize=8)


def plot_speedups(path: str, results: list[dict], dpi: int = 80) -> str:
    """Speed-up over the first layout (measured from the best step, and FLOPs-predicted) and
    tokens/s, by sequence length, from ``megatron_s2.benchmark.run_sweep``'s results."""
    if not results:
        raise ValueError("results must hold at least one sequence length")
    lengths = [r["benchmark"]["seq_length"] for r in results]
    layouts = [row["layout"] for row in results[0]["layouts"]]
    fig = Figure(figsize=(9.0, 3.6))
    speed, tokens = fig.subplots(1, 2)
    for i, layout in enumerate(layouts):
        rows = [next(row for row in r["layouts"] if row["layout"] == layout) for r in results]
        color = PALETTE[i % len(PALETTE)]
        speed.plot(lengths, [row["measured_speedup"] for row in rows], "o-", color=color, label=f"{layout} measured")
        speed.plot(lengths, [row["predicted_speedup"] for row in rows], "x--", color=color, label=f"{layout} FLOPs model")
        tokens.plot(lengths, [row["tokens_per_s"] for row in rows], "o-", color=color, label=layout)
    for ax in (speed, tokens):
        _length_axis(ax, lengths)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    speed.set_ylabel(f"step speed-up over {layouts[0]}", fontsize=8)
    tokens.set_ylabel("tokens/s (forward+backward)", fontsize=8)
    speed.legend(fontsize=6)
    tokens.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _attention_title(report: dict) -> str:
    """What an attention benchmark measured: shape, dtype, device and the S2 block pattern."""
    run = report["runs"][0]
    shape, layout = run["shape"], run["layout"]
    heads = f"h={shape['heads']}" + (f" (kv {shape['kv_heads']})" if shape["kv_heads"] != shape["heads"] else "")
    window = layout["local_blocks"] * layout["block_size"]
    pattern = (f"S2: block {layout['block_size']}, {layout['local_blocks']} local blocks ({window} tokens), "
               f"stride {layout['vert_stride']}" + (" (every block: the dense pattern)" if layout["vert_stride"] == 1 else "")
               + (f", {layout['num_dense_heads']} dense kv heads" if layout.get("num_dense_heads") else ""))
    device = report.get("machine", {}).get("device", shape["device"])
    return f"b={shape['batch']} {heads} d={shape['head_dim']} {shape['dtype']}, causal, on {device}\n{pattern}"


def plot_attention_benchmark(path: str, report: dict, dpi: int = 80) -> str:
    """Left: speed-up over the report's reference (dense causal SDPA) by sequence length
    (forward+backward solid, forward dashed), each method at the lengths it ran. Right: forward and
    backward milliseconds per method at the longest length. A method without a backward (e.g.
    FlexAttention on CPU) is labelled "forward only" and its bar hatched, so that its shorter bar is
    not read as a faster forward+backward. The title gives batch, heads, head dim, dtype, device and
    the block pattern (from ``scripts/bench_attention.py``'s report)."""
    runs = [r for r in report["runs"] if r["results"]]
    if not runs:
        raise ValueError("report must hold at least one run with results")
    lengths = [r["shape"]["seq_len"] for r in runs]
    names = list(dict.fromkeys(name for r in runs for name in r["results"]))
    forward_only = {name for r in runs for name, t in r["results"].items() if "fwd_bwd_s" not in t}
    label = {name: f"{name} (forward only)" if name in forward_only else name for name in names}
    fig = Figure(figsize=(9.0, 4.0))
    speed, times = fig.subplots(1, 2)
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        for key, style, what in (("speedup_fwd_bwd_vs_sdpa", "o-", "fwd+bwd"), ("speedup_fwd_vs_sdpa", "x--", "fwd")):
            points = [(n, r["results"][name][key]) for n, r in zip(lengths, runs) if key in r["results"].get(name, {})]
            if points:
                speed.plot(*zip(*points), style, color=color, label=f"{label[name]} {what}")
    _length_axis(speed, lengths)
    speed.set_ylabel(f"speed-up over {report.get('reference', 'dense causal SDPA')}", fontsize=8)
    longest = runs[-1]["results"]
    shown = [n for n in names if n in longest]
    forward = [longest[n]["forward_s"] * 1e3 for n in shown]
    backward = [longest[n].get("backward_s", 0.0) * 1e3 for n in shown]
    bars = times.bar(range(len(shown)), forward, color=SPARSE_COLOR, label="forward")
    times.bar(range(len(shown)), backward, bottom=forward, color=DENSE_COLOR, label="backward")
    for bar, name in zip(bars, shown):
        if name in forward_only:
            bar.set_hatch("//")
            bar.set_edgecolor("white")
            times.annotate("forward only:\nno backward", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                           xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=6)
    times.set_xticks(range(len(shown)), [label[n].replace(" (", "\n(") for n in shown])
    times.set_ylabel(f"ms per attention layer at {lengths[-1]} tokens", fontsize=8)
    times.margins(y=0.15)
    for ax in (speed, times):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(_attention_title(report), fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


LOSS_SPAN = 0.05
"""A loss panel's y axis spans at least this fraction of its largest loss, so that differences
smaller than that (noise, for a language model's loss) do not fill the panel."""


def _loss_limits(values: list[float]) -> tuple[float, float]:
    """y limits around ``values`` spanning at least LOSS_SPAN of the largest, plus a margin."""
    low, high = min(values), max(values)
    span = max(high - low, LOSS_SPAN * abs(high))
    middle = (low + high) / 2
    return middle - 0.55 * span, middle + 0.55 * span


def plot_loss_curves(path: str, runs: dict[str, list[dict]], title: str | None = None, dpi: int = 80) -> str:
    """Training loss (left: the trainer's logged loss, the mean over each log interval) and
    validation loss (right) against iteration, one line per run; ``runs`` maps a label to that
    run's metrics.jsonl records. Both panels share the iteration axis from 0, and each loss axis
    spans at least LOSS_SPAN of its largest loss (a single validation point per run is not
    magnified into a steep picture of noise)."""
    if not runs:
        raise ValueError("runs must hold at least one run")
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    train, valid = fig.subplots(1, 2, sharex=True)
    last = 0
    for i, (label, records) in enumerate(runs.items()):
        color = PALETTE[i % len(PALETTE)]
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "val_loss" in r]
        train.plot([r["iteration"] for r in steps], [r["loss"] for r in steps], color=color, label=label)
        valid.plot([r["iteration"] for r in evals], [r["val_loss"] for r in evals], "o-", color=color, label=label)
        last = max([last] + [r["iteration"] for r in records])
    for ax, name in ((train, "training loss (mean of each log interval)"), (valid, "validation loss")):
        values = [y for line in ax.get_lines() for y in line.get_ydata()]
        if values:
            ax.set_ylim(*_loss_limits(values))
        ax.set_xlim(0, max(last, 1) * 1.04)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "training and validation loss of " + ", ".join(runs), fontsize=10)
    return _save(fig, path, dpi)


def plot_needles(path: str, results: dict[str, dict], dpi: int = 80) -> str:
    """The needle-in-a-haystack picture: one heatmap per model (``results`` maps a label to an
    ``evaluate_needles`` result), accuracy over document length (x, tokens) and binding depth (y,
    top: the start of the document), side by side on one colour scale from 0 to 100%; every cell
    is written out."""
    if not results:
        raise ValueError("results must hold at least one model")
    first = next(iter(results.values()))
    fig = Figure(figsize=(1.0 + 2.6 * len(results), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(results), sharey=True, squeeze=False)[0])
    for ax, (label, r) in zip(axes, results.items()):
        accuracy = np.array(r["accuracy"], dtype=float).T * 100          # [depth, length]
        image = ax.imshow(accuracy, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
        for (k, n), value in np.ndenumerate(accuracy):
            ax.text(n, k, f"{value:.0f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(r["lengths"])), [str(n) for n in r["lengths"]])
        ax.set_xlabel("document length (tokens)", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(range(len(first["depths"])), [f"{d:.0%}" for d in first["depths"]])
    axes[0].set_ylabel("binding depth (% of the document before the question)", fontsize=8)
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    bar.set_label(f"accuracy (%), chance {first['chance']:.0%}", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    counts = sorted({r["documents"] for r in results.values()})
    fig.suptitle(f"needle retrieval: the question ends the document, {'/'.join(map(str, counts))} "
                 f"documents a cell", fontsize=10)
    return _save(fig, path, dpi)


def plot_recall_by_distance(path: str, results: dict[str, dict], dpi: int = 80) -> str:
    """Accuracy against the distance from the binding to the asked value (log scale, tokens), one
    line per model (``results`` maps a label to an ``evaluate_recall`` result), each point at the
    geometric middle of its distance bucket; chance dashed, the local window shaded."""
    if not results:
        raise ValueError("results must hold at least one model")
    first = next(iter(results.values()))
    fig = Figure(figsize=(8.4, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.axvspan(1, first["window"], color="#eeeeee", label=f"local window ({first['window']} tokens)")
    ax.axhline(first["chance"] * 100, color="black", linestyle="--", linewidth=1, label=f"chance ({first['chance']:.0%})")
    for i, (label, r) in enumerate(results.items()):
        points = [(np.sqrt(b["lo"] * b["hi"]), b["accuracy"] * 100) for b in r["buckets"] if b["accuracy"] is not None]
        ax.plot(*zip(*points), "o-", color=PALETTE[i % len(PALETTE)], label=label)
    edges = sorted({e for b in first["buckets"] for e in (b["lo"], b["hi"])})
    ax.set_xscale("log", base=2)
    ax.set_xticks(edges, [str(e) for e in edges])
    ax.set_xlim(1, edges[-1])
    ax.set_ylim(0, 105)
    ax.set_title(f"associative recall by distance, {edges[-1]}-token documents", fontsize=10)
    ax.set_xlabel("distance from the binding to the asked value (tokens, bucket edges)", fontsize=8)
    ax.set_ylabel("accuracy (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))      # beside the lines, never on them
    return _save(fig, path, dpi)
