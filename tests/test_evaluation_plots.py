"""Figures: the layout picture's numbers against independent counts, and every plot writes a PNG."""
import json

import pytest

from megatron_s2 import S2AttentionConfig
from megatron_s2.plots import (LOSS_SPAN, _count_ticks, _loss_limits, head_coverage, plot_layout, plot_loss_curves,
                               plot_speedups)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_small_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) < 200_000


def test_head_coverage_counts_groups_per_block_pair():
    # stride 4 over 4 kv heads (step 1): inside the 2-block window all 4 groups compute a pair,
    # beyond it exactly one group (the one whose residue the key block has).
    s2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4)
    count = head_coverage(s2, num_heads=8, num_kv_heads=4, num_blocks=12)
    for i in range(12):
        for j in range(12):
            expected = 0 if j > i else (4 if i - j < 2 else 1)
            assert count[i, j] == expected, (i, j)


def test_plot_layout_reports_densities_and_full_coverage(tmp_path):
    s2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4)
    info = plot_layout(str(tmp_path / "layout.png"), s2=s2, num_heads=4, num_kv_heads=4, layout="DSSD",
                       seq_length=256)
    assert_small_png(info["path"])
    # 16 blocks: per head 2 + 1 + ... window pairs; count them directly.
    n, per_head = 16, 0
    for g in range(4):
        per_head += sum(1 for i in range(n) for j in range(i + 1)
                        if i - j < 2 or (j + g) % 4 == 0)
    sparse = per_head / (4 * n * (n + 1) / 2)
    assert info["densities"] == pytest.approx([1.0, sparse, sparse, 1.0])
    assert info["coverage"] == 1.0


def test_plot_layout_shows_uncovered_blocks_of_homogeneous_heads(tmp_path):
    s2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4, homo_head=True)
    info = plot_layout(str(tmp_path / "homo.png"), s2=s2, num_heads=4, num_kv_heads=4, layout="SS",
                       seq_length=256)
    n = 16
    covered = sum(1 for i in range(n) for j in range(i + 1) if i - j < 2 or j % 4 == 0)
    assert info["coverage"] == pytest.approx(covered / (n * (n + 1) / 2))


def test_plot_layout_rejects_a_length_off_the_block_grid(tmp_path):
    with pytest.raises(ValueError, match="seq_length"):
        plot_layout(str(tmp_path / "x.png"), s2=S2AttentionConfig(block_size=16), num_heads=4,
                    num_kv_heads=4, layout="S", seq_length=100)


def test_speedup_and_loss_figures_are_written(tmp_path):
    def row(layout, step, predicted):
        return {"layout": layout, "best_step_s": step, "measured_speedup": 2.0 / step,
                "predicted_speedup": predicted, "tokens_per_s": 1000 / step}
    results = [{"benchmark": {"seq_length": n},
                "layouts": [row("DD", 2.0, 1.0), row("SD", 1.5, 1.4)]} for n in (1024, 2048)]
    assert_small_png(plot_speedups(str(tmp_path / "speed.png"), results))
    runs = {"a": [{"iteration": 10, "loss": 3.0}, {"iteration": 20, "loss": 2.5, "val_loss": 2.6}],
            "b": [{"iteration": 10, "loss": 3.1}, {"iteration": 20, "val_loss": 2.7}]}
    assert_small_png(plot_loss_curves(str(tmp_path / "loss.png"), json.loads(json.dumps(runs))))


def test_axes_do_not_magnify_noise_and_count_scales_read_at_one_head():
    """One validation point per run, 2.429 and 2.434: the loss axis spans 5% of the loss, not the
    0.005 between them; the union panel's colour scale has a tick per count up to 8 (one head: 1)."""
    low, high = _loss_limits([2.429, 2.434])
    assert low < 2.429 and high > 2.434 and high - low >= LOSS_SPAN * 2.434
    assert _loss_limits([5.5, 1.1]) == pytest.approx((1.1 - 0.05 * 4.4, 5.5 + 0.05 * 4.4))
    assert _count_ticks(1) == [1] and _count_ticks(4) == [1, 2, 3, 4]
    ticks = _count_ticks(32)
    assert ticks[0] == 1 and ticks[-1] == 32 and len(ticks) <= 10


def test_attention_benchmark_writes_its_report_and_figure(tmp_path):
    """scripts/bench_attention.py end to end on a small shape: two lengths, JSON and PNG."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "scripts/bench_attention.py", "--preset", "cpu", "--seq-lens", "256", "512",
                          "--repeats", "1", "--memory-seq-len", "0", "--no-flex",
                          "--json", str(tmp_path / "bench.json"), "--figure", str(tmp_path / "bench.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["shape"]["seq_len"] for r in report["runs"]] == [256, 512]
    assert set(report["runs"][0]["results"]) == {"sdpa_causal", "s2_torch"}
    assert_small_png(tmp_path / "bench.png")
