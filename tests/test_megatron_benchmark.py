"""The hybrid step benchmark runs end to end on a tiny model (its figures are not checked here:
they depend on the machine; scripts/bench_training.py reports them)."""
import pytest

from megatron_s2 import S2AttentionConfig
from megatron_s2.benchmark import HybridStepBenchmark, format_sweep_table, run_benchmark


@pytest.mark.slow
def test_benchmark_runs_and_reports_every_layout():
    bench = HybridStepBenchmark(layouts=("DD", "SD"), hidden_size=64, num_attention_heads=4,
                                vocab_size=64, seq_length=256, warmup_steps=0, steps=1, rounds=1,
                                s2=S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=4))
    result = run_benchmark(bench)
    base, hybrid = result["layouts"]
    assert (base["layout"], hybrid["layout"]) == ("DD", "SD")
    assert base["measured_speedup"] == base["predicted_speedup"] == 1.0
    assert hybrid["predicted_speedup"] > 1.0
    assert all(r["median_step_s"] > 0 and r["peak_memory_bytes"] > 0 for r in result["layouts"])
    assert "SD" in format_sweep_table([result])


def test_benchmark_rejects_mismatched_layouts():
    with pytest.raises(ValueError, match="has 3 characters but num_layers is 4"):
        HybridStepBenchmark(layouts=("DDDD", "DSS"))
