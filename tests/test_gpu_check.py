"""scripts/gpu_check_summary.py on the files a GPU check leaves: step outcomes, the training tests
of tests/test_gpu_engine.py, attention rows (a failed method named), training rows, and each
target of issue 11 judged from the figures, or 'unmeasured' where a step left nothing."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_triton_attention" name="test_gpu_backward_is_deterministic"/>
<testcase classname="tests.test_gpu_engine" name="test_gpu_engine_fp32_equals_cpu_engine"/>
<testcase classname="tests.test_gpu_engine" name="test_two_ranks_on_one_gpu_equal_one_process[dp2]">
<failure message="losses differ"/></testcase>
<testcase classname="tests.test_gpu_engine" name="test_two_ranks_on_one_gpu_equal_one_process[cp2]">
<skipped message="no backend puts two ranks on one GPU"/></testcase>
</testsuite></testsuites>"""


def _attention(seq_ms: dict, errors: dict | None = None) -> dict:
    """A bench_attention report: {method: {seq: forward+backward ms}}."""
    lengths = sorted({n for times in seq_ms.values() for n in times})
    runs = [{"shape": {"seq_len": n},
             "results": {m: {"forward_s": t[n] / 3e3, "backward_s": 2 * t[n] / 3e3, "fwd_bwd_s": t[n] / 1e3,
                             "tflops_fwd_bwd": 100.0} for m, t in seq_ms.items() if n in t},
             "errors": (errors or {}).get(n, {})} for n in lengths]
    return {"runs": runs}


def _summarize(out: Path) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "scripts/gpu_check_summary.py", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "summary.json").read_text()), proc.stdout


def test_summary_of_a_full_run(tmp_path):
    steps = [{"step": "pytest_gpu", "status": "failed", "seconds": 90, "detail": "exit status 1"},
             {"step": "attention_s2", "status": "passed", "seconds": 100, "detail": ""}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "pytest_gpu.xml").write_text(JUNIT)
    (tmp_path / "attention_s2.json").write_text(json.dumps(_attention(
        {"sdpa_flash": {32768: 400.0, 65536: 1600.0}, "s2_triton": {32768: 60.0, 65536: 180.0},
         "flex_attention": {32768: 90.0, 65536: 170.0}},
        errors={65536: {"sdpa_cudnn": "RuntimeError: No available kernel"}})))
    (tmp_path / "attention_dense.json").write_text(json.dumps(_attention(
        {"sdpa_flash": {32768: 400.0, 65536: 1600.0}, "s2_triton": {32768: 440.0, 65536: 1900.0}})))
    row = {"layout": "DSSSDSSS", "tokens_per_s": 30000.0, "tflops_per_s": 300.0, "mfu": 0.3,
           "measured_speedup": 1.9, "predicted_speedup": 2.1}
    (tmp_path / "training_32k.json").write_text(json.dumps([{"benchmark": {"seq_length": 32768}, "layouts": [row]}]))

    summary, printed = _summarize(tmp_path)

    assert [s["status"] for s in summary["steps"]] == ["failed", "passed"]
    assert summary["pytest_gpu"]["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    engine = summary["pytest_gpu"]["engine_tests"]
    assert list(engine) == ["test_gpu_engine_fp32_equals_cpu_engine", "test_two_ranks_on_one_gpu_equal_one_process[dp2]",
                            "test_two_ranks_on_one_gpu_equal_one_process[cp2]"]
    assert engine["test_two_ranks_on_one_gpu_equal_one_process[dp2]"] == "failed"
    assert engine["test_two_ranks_on_one_gpu_equal_one_process[cp2]"].startswith("skipped: no backend")
    met = {t["target"]: (t["measured"], t["met"]) for t in summary["targets"]}
    assert met["S2 fwd+bwd vs SDPA flash at 64k (stride 16)"] == ("8.89x", True)
    assert met["S2 dense pattern (stride 1) fwd+bwd vs SDPA flash"] == ("1.19x the time of flash (worst length)", False)
    assert met["S2 fwd+bwd vs FlexAttention, same mask"] == ("32k: 1.50x, 64k: 0.94x", False)
    assert "| stride 16 | 65536 | sdpa_cudnn | failed: RuntimeError: No available kernel |" in printed
    assert "| 32768 | DSSSDSSS | 3e+04 | 300 | 0.3 | 1.9 | 2.1 |" in printed
    assert printed == (tmp_path / "summary.md").read_text()


def test_summary_of_a_run_that_left_nothing(tmp_path):
    summary, printed = _summarize(tmp_path)
    assert summary["steps"] == [] and summary["pytest_gpu"] is None
    assert [t["measured"] for t in summary["targets"]] == ["unmeasured"] * 3
    assert printed.count("| unmeasured |") == 5          # attention, training, three targets
