"""bench_training's sweep: bad lengths are refused before any process starts; the table has one
row per (length, layout) with the numbers it was given."""
import pytest

from megatron_s2 import S2AttentionConfig
from megatron_s2.benchmark import HybridStepBenchmark, format_sweep_table, run_sweep


def test_sweep_refuses_lengths_off_the_block_grid():
    bench = HybridStepBenchmark(layouts=("DD", "SD"), s2=S2AttentionConfig(block_size=64))
    with pytest.raises(ValueError, match="seq_lengths entry 1000"):
        run_sweep(bench, [4096, 1000])
    with pytest.raises(ValueError, match="at least one length"):
        run_sweep(bench, [])


def test_sweep_table_rows():
    def row(layout, best, speedup, predicted):
        return {"layout": layout, "tokens_per_s": 1024 / best, "best_step_s": best, "median_step_s": best,
                "peak_memory_bytes": 2**30, "step_memory_bytes": 2**29, "measured_speedup": speedup,
                "median_speedup": speedup, "predicted_speedup": predicted, "tflops_per_s": 0.1, "mfu": None,
                "fraction_of_predicted": speedup / predicted, "step_times_s": [best]}
    results = [{"benchmark": {"seq_length": 1024}, "load_average_1m_before_after": [1.0, 2.0], "torch_threads": 2,
                "layouts": [row("DD", 2.0, 1.0, 1.0), row("SD", 1.0, 2.0, 2.5)]}]
    lines = format_sweep_table(results).splitlines()
    assert lines[2].split()[:3] == ["1024", "DD", "512"]
    assert lines[3].split()[:3] == ["1024", "SD", "1024"] and "0.80" in lines[3] and "1.0->2.0" in lines[3]
