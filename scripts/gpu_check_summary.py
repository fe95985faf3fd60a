"""Summary of a ``scripts/gpu_check.sh`` run: reads what its steps left in OUT_DIR, writes
OUT_DIR/summary.json and OUT_DIR/summary.md (a section to paste into docs/BENCHMARKS.md) and prints
the markdown. Standard library only, so it reports whatever state the steps left.

    python scripts/gpu_check_summary.py OUT_DIR

Reads: steps.jsonl (one {"step", "status", "seconds", "detail"} per step), pytest_gpu.xml (JUnit),
attention_s2.json and attention_dense.json (scripts/bench_attention.py), training_32k.json
(scripts/bench_training.py). A file a step did not write is reported as missing.
"""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ENGINE_TESTS = "tests/test_gpu_engine.py"
"""The training checks (issue 11, items 3-5) run inside ``pytest -m gpu``; listed one by one."""
TARGETS = (("S2 fwd+bwd vs SDPA flash at 64k (stride 16)", ">= 8x"),
           ("S2 dense pattern (stride 1) fwd+bwd vs SDPA flash", "within 1.15x"),
           ("S2 fwd+bwd vs FlexAttention, same mask", "faster at every length"))


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def environment() -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version()}
    try:
        env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=30).stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        env["gpu"] = "none (no nvidia-smi)"
    for dist in ("torch", "triton", "megatron-core", "hydra-core", "pytest-xdist"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "absent"
    return env


def pytest_results(path: Path) -> dict | None:
    """Counts by outcome, and the outcome of every test of ENGINE_TESTS."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts, engine = {"passed": 0, "failed": 0, "skipped": 0}, {}
    for case in root.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = f"skipped: {child.get('message', '')}"
        counts[outcome.split(":")[0]] += 1
        if case.get("classname", "").replace(".", "/") + ".py" == ENGINE_TESTS:
            engine[case.get("name")] = outcome
    return {"counts": counts, "engine_tests": engine}


def attention_rows(report: dict | None, pattern: str) -> list[dict]:
    rows = []
    for run in (report or {}).get("runs", []):
        for method, t in run["results"].items():
            rows.append({"pattern": pattern, "seq": run["shape"]["seq_len"], "method": method,
                         "fwd_ms": t["forward_s"] * 1e3, "bwd_ms": t.get("backward_s", float("nan")) * 1e3,
                         "fwd_bwd_ms": t.get("fwd_bwd_s", float("nan")) * 1e3,
                         "tflops": t.get("tflops_fwd_bwd", t.get("tflops_fwd")),
                         "speedup_fwd_bwd_vs_flash": t.get("speedup_fwd_bwd_vs_sdpa")})
        rows += [{"pattern": pattern, "seq": run["shape"]["seq_len"], "method": method, "error": error}
                 for method, error in run.get("errors", {}).items()]
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """Each target of issue 11 with its measured value, or 'unmeasured'."""
    def f_b(pattern, method):
        return {r["seq"]: r["fwd_bwd_ms"] for r in rows if r["pattern"] == pattern and r["method"] == method
                and "error" not in r}
    s2, flash, flex = f_b("stride 16", "s2_triton"), f_b("stride 16", "sdpa_flash"), f_b("stride 16", "flex_attention")
    dense, dense_flash = f_b("stride 1", "s2_triton"), f_b("stride 1", "sdpa_flash")
    out = []
    if 65536 in s2 and 65536 in flash:
        ratio = flash[65536] / s2[65536]
        out.append((f"{ratio:.2f}x", ratio >= 8))
    else:
        out.append(("unmeasured", None))
    common = sorted(set(dense) & set(dense_flash))
    if common:
        worst = max(dense[n] / dense_flash[n] for n in common)
        out.append((f"{worst:.2f}x the time of flash (worst length)", worst <= 1.15))
    else:
        out.append(("unmeasured", None))
    common = sorted(set(s2) & set(flex))
    if common:
        out.append((", ".join(f"{n // 1024}k: {flex[n] / s2[n]:.2f}x" for n in common),
                    all(s2[n] < flex[n] for n in common)))
    else:
        out.append(("unmeasured", None))
    return [{"target": name, "bar": bar, "measured": value, "met": met}
            for (name, bar), (value, met) in zip(TARGETS, out)]


def training_rows(results: list | None) -> list[dict]:
    return [{"seq": r["benchmark"]["seq_length"], "layers": len(row["layout"]), **row}
            for r in results or [] for row in r["layouts"]]


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def markdown(s: dict) -> str:
    env = s["environment"]
    lines = [f"### GPU check, {env['date']}", "",
             f"Device: {env['gpu']}; Python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
             f"megatron-core {env['megatron-core']}, pytest-xdist {env['pytest-xdist']}.", "",
             *_table(["step", "status", "s", "detail"],
                     [[st["step"], st["status"], st["seconds"], st["detail"]] for st in s["steps"]])]
    tests = s["pytest_gpu"]
    if tests:
        c = tests["counts"]
        lines += ["", f"`pytest -m gpu`: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped. "
                      f"Training checks ({ENGINE_TESTS}):", "",
                  *_table(["test", "outcome"], [[n, o] for n, o in tests["engine_tests"].items()] or [["none ran", "-"]])]
    lines += ["", "Attention, b=4 h=16 d=128 bf16, block 64, 8 local blocks (512 tokens); median of 3 after a "
                  "warm-up; TFLOP/s on the computed blocks:", ""]
    lines += _table(["pattern", "seq", "method", "fwd ms", "bwd ms", "f+b ms", "TFLOP/s", "x flash f+b"],
                    [[r["pattern"], r["seq"], r["method"], *(
                        [r["fwd_ms"], r["bwd_ms"], r["fwd_bwd_ms"], r["tflops"], r["speedup_fwd_bwd_vs_flash"]]
                        if "error" not in r else [f"failed: {r['error']}", None, None, None, None])]
                     for r in s["attention"]] or [["unmeasured", *[None] * 7]])
    layers = sorted({r["layers"] for r in s["training"]})
    lines += ["", f"Training step (forward+backward), llama_1p3b_32k shape with {'/'.join(map(str, layers)) or 'some'} "
                  "of its 24 layers, bf16, one GPU; speed-up over the first layout:", ""]
    lines += _table(["seq", "layout", "tokens/s", "TFLOP/s", "MFU", "speed-up", "FLOPs model"],
                    [[r["seq"], r["layout"], r["tokens_per_s"], r["tflops_per_s"], r["mfu"], r["measured_speedup"],
                      r["predicted_speedup"]] for r in s["training"]] or [["unmeasured", *[None] * 6]])
    lines += ["", *_table(["target", "bar", "measured", "met"],
                          [[t["target"], t["bar"], t["measured"], {True: "yes", False: "NO", None: "-"}[t["met"]]]
                           for t in s["targets"]])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: gpu_check_summary.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "steps.jsonl").exists() else []
    rows = attention_rows(_load(out / "attention_s2.json"), "stride 16") + \
        attention_rows(_load(out / "attention_dense.json"), "stride 1")
    summary = {"environment": environment(), "steps": steps, "pytest_gpu": pytest_results(out / "pytest_gpu.xml"),
               "attention": rows, "targets": targets(rows), "training": training_rows(_load(out / "training_32k.json"))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
