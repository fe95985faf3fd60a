"""scripts/gpu_check_summary.py on the files a part of the GPU check leaves: step outcomes, the
pytest results (failed tests named, the training tests of tests/test_gpu_engine.py, tests cut short
by an interrupt), attention rows (a failed method named), training rows, and each of the four
targets judged from synthetic figures, or 'unmeasured' where a step left nothing or measured
something else (forward only, a CPU, another model shape)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
summary_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary_module)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_triton_attention" name="test_gpu_backward_is_deterministic"/>
<testcase classname="tests.test_triton_attention" name="test_gpu_matches_reference[bf16-mha]">
<failure message="Failed: Timeout &gt;150.0s">traceback</failure></testcase>
<testcase classname="tests.test_gpu_engine" name="test_gpu_engine_fp32_equals_cpu_engine"/>
<testcase classname="tests.test_gpu_engine" name="test_two_ranks_on_one_gpu_equal_one_process[dp2]">
<failure message="AssertionError: ('loss', [1.0], [2.0])&#10;more"/></testcase>
<testcase classname="tests.test_gpu_engine" name="test_two_ranks_on_one_gpu_equal_one_process[cp2]">
<skipped message="gloo on CUDA tensors cannot run what cp2 needs"/></testcase>
<testcase time="0.000"/>
</testsuite></testsuites>"""
TARGETS = [name for name, _ in summary_module.TARGETS]


def _attention(seq_ms: dict, stride: int, errors: dict | None = None, forward_only=()) -> dict:
    """A bench_attention report: {method: {seq: forward+backward ms}} (forward_only: forward ms)."""
    lengths = sorted({n for times in seq_ms.values() for n in times})

    def timing(method, ms):
        if method in forward_only:
            return {"forward_s": ms / 1e3, "tflops_fwd": 1.0}
        return {"forward_s": ms / 3e3, "backward_s": 2 * ms / 3e3, "fwd_bwd_s": ms / 1e3, "tflops_fwd_bwd": 100.0}
    shape = {"batch": 4, "heads": 16, "kv_heads": 16, "head_dim": 128, "dtype": "bfloat16", "device": "cuda"}
    layout = {"block_size": 64, "local_blocks": 8, "vert_stride": stride}
    return {"runs": [{"shape": shape | {"seq_len": n}, "layout": layout,
                      "results": {m: timing(m, t[n]) for m, t in seq_ms.items() if n in t},
                      "errors": (errors or {}).get(n, {})} for n in lengths]}


def _training(hybrid_median: float, device: str = "cuda", seq: int = 32768, **shape) -> list:
    """A bench_training result of DDDDDDDD against DSSSDSSS on the llama_1p3b_32k shape (or ``shape``)."""
    bench = {k: v for k, v in summary_module.LLAMA_1P3B_32K.items() if k != "layout"} | {
        "seq_length": seq, "device": device, "layouts": ["DDDDDDDD", "DSSSDSSS"]} | shape
    row = {"tokens_per_s": 30000.0, "tflops_per_s": 300.0, "mfu": 0.3, "predicted_speedup": 2.1}
    return [{"benchmark": bench, "layouts": [
        row | {"layout": "DDDDDDDD", "measured_speedup": 1.0, "median_speedup": 1.0, "predicted_speedup": 1.0},
        row | {"layout": "DSSSDSSS", "measured_speedup": hybrid_median + 0.1, "median_speedup": hybrid_median}]}]


def _write_speed(directory: Path, s2_64k_ms: float, dense_64k_ms: float, flex_64k_ms: float, training: list,
                 flex_forward_only: bool = False) -> None:
    (directory / "attention_s2.json").write_text(json.dumps(_attention(
        {"sdpa_flash": {32768: 400.0, 65536: 1600.0}, "s2_triton": {32768: 60.0, 65536: s2_64k_ms},
         "flex_attention": {32768: 90.0, 65536: flex_64k_ms}}, 16,
        errors={65536: {"sdpa_cudnn": "RuntimeError: No available kernel"}},
        forward_only=("flex_attention",) if flex_forward_only else ())))
    (directory / "attention_dense.json").write_text(json.dumps(_attention(
        {"sdpa_flash": {32768: 400.0, 65536: 1600.0}, "s2_triton": {32768: 440.0, 65536: dense_64k_ms}}, 1)))
    (directory / "training_32k.json").write_text(json.dumps(training))


def _judged(directory: Path) -> dict:
    return {t["target"]: (t["measured"], t["met"]) for t in summary_module.summarize(directory, ["speed"])["targets"]}


def test_the_four_targets_met(tmp_path):
    _write_speed(tmp_path, s2_64k_ms=180.0, dense_64k_ms=1800.0, flex_64k_ms=200.0, training=_training(2.05))
    assert _judged(tmp_path) == {
        TARGETS[0]: ("8.89x", True),
        TARGETS[1]: ("1.12x the time of flash (worst of 32k, 64k)", True),
        TARGETS[2]: ("32k: 1.50x, 64k: 1.11x", True),
        TARGETS[3]: ("2.05x (DSSSDSSS vs DDDDDDDD; best step 2.15x)", True)}


def test_the_four_targets_missed(tmp_path):
    _write_speed(tmp_path, s2_64k_ms=210.0, dense_64k_ms=1900.0, flex_64k_ms=170.0, training=_training(1.95))
    judged = _judged(tmp_path)
    assert judged[TARGETS[0]] == ("7.62x", False)
    assert judged[TARGETS[1]] == ("1.19x the time of flash (worst of 32k, 64k)", False)
    assert judged[TARGETS[2]] == ("32k: 1.50x, 64k: 0.81x", False)
    assert judged[TARGETS[3]] == ("1.95x (DSSSDSSS vs DDDDDDDD; best step 2.05x)", False)


@pytest.mark.parametrize("training,why", [
    (_training(2.5, device="cpu"), "unmeasured"),
    (_training(2.5, seq=16384), "unmeasured"),
    (_training(2.5, hidden_size=1024), "unmeasured: not the recipe's shape (hidden_size 1024 (recipe 2048))"),
    (_training(2.5, s2={"block_size": 64, "local_blocks": 8, "vert_stride": 16, "head_sharding": "query"}),
     "unmeasured: not the recipe's shape (s2.local_blocks 8 (recipe 16))")])
def test_training_target_only_on_the_recipes_shape_on_cuda_at_32k(tmp_path, training, why):
    _write_speed(tmp_path, 180.0, 1800.0, 200.0, training)
    assert _judged(tmp_path)[TARGETS[3]] == (why, None)


def test_a_forward_only_flex_attention_is_not_judged(tmp_path):
    """FlexAttention without a backward (its CPU build) has no forward+backward time to beat."""
    _write_speed(tmp_path, 180.0, 1800.0, 50.0, _training(2.05), flex_forward_only=True)
    assert _judged(tmp_path)[TARGETS[2]] == ("unmeasured", None)


def test_llama_shape_is_the_recipes():
    from megatron_s2.training.config import compose_config

    cfg = compose_config([], recipe="llama_1p3b_32k")
    want = summary_module.LLAMA_1P3B_32K
    assert {key: cfg.model[key] for key in ("hidden_size", "num_attention_heads", "num_query_groups",
                                            "ffn_hidden_size", "swiglu")} == {k: v for k, v in want.items()
                                                                              if k not in ("s2", "layout")}
    assert {key: cfg.attention.s2[key] for key in want["s2"]} == want["s2"]
    assert cfg.attention.layout == want["layout"] and cfg.train.seq_length == 32768


def test_summary_of_the_correctness_part(tmp_path):
    (tmp_path / "pytest_gpu.xml").write_text(JUNIT)
    tests = summary_module.summarize(tmp_path, ["correctness"])["pytest_gpu"]
    assert tests["counts"] == {"passed": 2, "failed": 2, "skipped": 1, "interrupted": 1}
    assert tests["failed"] == {
        "tests.test_triton_attention::test_gpu_matches_reference[bf16-mha]": "Failed: Timeout >150.0s",
        "tests.test_gpu_engine::test_two_ranks_on_one_gpu_equal_one_process[dp2]": "AssertionError: ('loss', [1.0], [2.0])"}
    assert tests["engine_tests"] == {
        "test_gpu_engine_fp32_equals_cpu_engine": "passed",
        "test_two_ranks_on_one_gpu_equal_one_process[dp2]": "failed",
        "test_two_ranks_on_one_gpu_equal_one_process[cp2]": "skipped: gloo on CUDA tensors cannot run what cp2 needs"}


def test_summary_command_writes_json_and_markdown(tmp_path):
    steps = [{"step": "attention_s2", "status": "timeout", "seconds": 100, "detail": "stopped at its 100 s limit"}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    _write_speed(tmp_path, 180.0, 1800.0, 200.0, _training(2.05))
    proc = subprocess.run([sys.executable, "scripts/gpu_check_summary.py", str(tmp_path), "--part", "speed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == steps
    assert "| attention_s2 | timeout | 100 | stopped at its 100 s limit |" in proc.stdout
    assert "| stride 16 | 65536 | sdpa_cudnn | failed: RuntimeError: No available kernel |" in proc.stdout
    assert "| 32768 | cuda | DSSSDSSS | 3e+04 | 300 | 0.3 | 2.15 | 2.05 | 2.1 |" in proc.stdout
    assert "pytest -m gpu" not in proc.stdout                # the correctness part's section is not there


def test_summary_of_a_part_that_left_nothing(tmp_path):
    s = summary_module.summarize(tmp_path, ["correctness", "speed"])
    assert s["steps"] == [] and s["pytest_gpu"] is None
    assert [t["measured"] for t in s["targets"]] == ["unmeasured"] * 4
    text = summary_module.markdown(s)
    assert "no JUnit XML" in text and text.count("| unmeasured |") == 6      # attention, training, four targets
