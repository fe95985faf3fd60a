"""The hybrid step benchmark runs end to end on a tiny model (its figures are not checked here:
they depend on the machine; scripts/bench_training.py reports them), and scripts/bench_training.py
turns its arguments into the benchmark it should (the GPU check's call included) or exits 2."""
import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_s2 import S2AttentionConfig, training_flops_per_token
from megatron_s2.benchmark import HybridStepBenchmark, format_sweep_table, run_benchmark

REPO = Path(__file__).resolve().parents[1]


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


def _bench_training_script():
    spec = importlib.util.spec_from_file_location("bench_training", REPO / "scripts" / "bench_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LLAMA_1P3B_SHAPE = ["--hidden-size", "2048", "--num-attention-heads", "16", "--num-query-groups", "8",
                    "--ffn-hidden-size", "5632", "--swiglu", "--block-size", "64", "--local-blocks", "16",
                    "--vert-stride", "16", "--layouts", "DDDDDDDD", "DSSSDSSS"]


def test_bench_training_expresses_the_llama_shape_in_bf16_on_cuda():
    """The GPU check's call: the recipe's model shape and S2 pattern, bf16 on CUDA, MFU against the
    given peak; the FLOPs model predicts the hybrid faster. (No CUDA needed to parse and configure.)"""
    args, benches = _bench_training_script().parse(
        ["--device", "cuda", "--seq-lengths", "32768", "--peak-tflops", "989.4", "--s2", "head_sharding=query",
         *LLAMA_1P3B_SHAPE])
    (bench,) = benches
    assert (bench.seq_length, bench.peak_tflops) == (32768, 989.4)
    assert (bench.s2.head_sharding, bench.s2.local_blocks, bench.s2.vert_stride) == ("query", 16, 16)
    config = bench.transformer_config(8)
    assert config.params_dtype == torch.bfloat16 and config.bf16 and not config.use_cpu_initialization
    assert (config.gated_linear_unit, config.ffn_hidden_size, config.num_query_groups) == (True, 5632, 8)
    dense, hybrid = (training_flops_per_token(config, layout, bench.s2, 32768, bench.vocab_size).sparse
                     for layout in bench.layouts)
    assert dense / hybrid > 1.5


def test_bench_training_is_fp32_on_cpu_without_mfu():
    _, benches = _bench_training_script().parse(["--seq-lengths", "1024", "512"])
    assert [b.seq_length for b in benches] == [512, 1024]
    config = benches[0].transformer_config(4)
    assert config.params_dtype == torch.float32 and not config.bf16 and config.use_cpu_initialization
    assert benches[0].peak_tflops is None


@pytest.mark.parametrize("args,match", [
    (["--seq-lengths", "4096", "1000"], "seq_lengths entry 1000"),
    (["--s2", "vert_stride"], "--s2 takes KEY=VALUE"),
    (["--s2", "cp_exchange=ring"], "s2.cp_exchange must be one of"),
    (["--num-attention-heads", "8", "--num-query-groups", "3"], "must be a multiple of num_query_groups"),
])
def test_bench_training_bad_arguments_exit_2_before_any_model(args, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench_training_script().parse(args)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
