"""Summary of one part of a ``scripts/gpu_check.sh`` run: reads what its steps left in DIR, writes
DIR/summary.json and DIR/summary.md (a section to paste into docs/BENCHMARKS.md) and prints the
markdown. Standard library only, so it reports whatever state the steps left.

    python scripts/gpu_check_summary.py DIR [--part correctness|speed]

Reads: steps.jsonl (one {"step", "status", "seconds", "detail"} per step); for the correctness part
pytest_gpu.xml (JUnit); for the speed part attention_s2.json and attention_dense.json
(scripts/bench_attention.py) and training_32k.json (scripts/bench_training.py). Without --part,
both. A file a step did not write is reported as missing, and each target it would measure as
unmeasured.

The speed part judges the four targets of docs/BENCHMARKS.md (``TARGETS``), on the GPU methods only
(``sdpa_flash``, ``s2_triton``, ``flex_attention`` with a backward; CUDA training steps): S2
forward+backward at least 8x SDPA flash at 64k; the dense pattern (stride 1) within 1.15x of SDPA
flash at every length; S2 faster than FlexAttention on the same mask at every length; the hybrid
training step at least 2x the dense one (median step) at 32k on the ``llama_1p3b_32k`` shape
(``LLAMA_1P3B_32K``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ENGINE_TESTS = "tests/test_gpu_engine.py"
"""The training checks run inside ``pytest -m gpu``; listed one by one."""
TARGETS = (("S2 fwd+bwd vs SDPA flash at 64k", ">= 8x"),
           ("S2 dense pattern (stride 1) fwd+bwd vs SDPA flash", "within 1.15x at every length"),
           ("S2 fwd+bwd vs FlexAttention, same mask", "faster at every length"),
           ("hybrid training step vs dense at 32k, llama_1p3b_32k shape", ">= 2x (median step)"))
LLAMA_1P3B_32K = {"hidden_size": 2048, "num_attention_heads": 16, "num_query_groups": 8, "ffn_hidden_size": 5632,
                  "swiglu": True, "s2": {"block_size": 64, "local_blocks": 16, "vert_stride": 16,
                                         "head_sharding": "query"},
                  "layout": "DSSSDSSSDSSSDSSSDSSSDSSS"}
"""recipes/llama_1p3b_32k.yaml's model shape, S2 settings and layout (tests/test_gpu_check.py
compares them with the recipe); the benchmark may run the first layers of its layout."""


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
    for dist in ("torch", "triton", "megatron-core", "hydra-core", "pytest-xdist", "pytest-timeout"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "absent"
    return env


def pytest_results(path: Path) -> dict | None:
    """Counts by outcome, the failed tests with their message's first line, and the outcome of
    every test of ENGINE_TESTS. A test cut short by an interrupt (a nameless JUnit entry, as
    pytest-xdist leaves it) counts as interrupted."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts, failed, engine = {"passed": 0, "failed": 0, "skipped": 0, "interrupted": 0}, {}, {}
    for case in root.iter("testcase"):
        if not case.get("name"):
            counts["interrupted"] += 1
            continue
        outcome, name = "passed", f"{case.get('classname', '')}::{case.get('name')}"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                failed[name] = (child.get("message") or "").strip().split("\n")[0][:300]
            elif child.tag == "skipped":
                outcome = f"skipped: {child.get('message', '')}"
        counts[outcome.split(":")[0]] += 1
        if case.get("classname", "").replace(".", "/") + ".py" == ENGINE_TESTS:
            engine[case.get("name")] = outcome
    return {"counts": counts, "failed": failed, "engine_tests": engine}


def attention_rows(report: dict | None, step: str) -> list[dict]:
    """One row per (length, method) of a bench_attention report, tagged with the step that made it."""
    rows = []
    for run in (report or {}).get("runs", []):
        pattern = f"stride {run['layout']['vert_stride']}"
        for method, t in run["results"].items():
            rows.append({"step": step, "pattern": pattern, "seq": run["shape"]["seq_len"], "method": method,
                         "fwd_ms": t["forward_s"] * 1e3, "bwd_ms": t.get("backward_s", float("nan")) * 1e3,
                         "fwd_bwd_ms": t.get("fwd_bwd_s", float("nan")) * 1e3,
                         "tflops": t.get("tflops_fwd_bwd", t.get("tflops_fwd")),
                         "speedup_fwd_bwd_vs_ref": t.get("speedup_fwd_bwd_vs_sdpa")})
        rows += [{"step": step, "pattern": pattern, "seq": run["shape"]["seq_len"], "method": method, "error": error}
                 for method, error in run.get("errors", {}).items()]
    return rows


def attention_shape(report: dict | None) -> str | None:
    """The shape and pattern of a bench_attention report, in words."""
    if not (report or {}).get("runs"):
        return None
    shape, layout = report["runs"][0]["shape"], report["runs"][0]["layout"]
    return (f"b={shape['batch']} h={shape['heads']} kv_heads={shape['kv_heads']} d={shape['head_dim']} "
            f"{shape['dtype']} on {shape['device']}, block {layout['block_size']}, {layout['local_blocks']} local "
            f"blocks ({layout['local_blocks'] * layout['block_size']} tokens)")


def training_rows(results: list | None) -> list[dict]:
    return [{"seq": r["benchmark"]["seq_length"], "device": r["benchmark"]["device"], "layers": len(row["layout"]),
             **row} for r in results or [] for row in r["layouts"]]


def _llama_1p3b_mismatch(benchmark: dict) -> str | None:
    """None if bench_training's settings are the llama_1p3b_32k shape, else what differs."""
    want = LLAMA_1P3B_32K
    for key in ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "swiglu"):
        if benchmark.get(key) != want[key]:
            return f"{key} {benchmark.get(key)} (recipe {want[key]})"
    for key, value in want["s2"].items():
        if benchmark.get("s2", {}).get(key) != value:
            return f"s2.{key} {benchmark.get('s2', {}).get(key)} (recipe {value})"
    return None


def _training_target(results: list | None) -> tuple[str, bool | None]:
    for result in results or []:
        bench = result["benchmark"]
        if bench["seq_length"] != 32768 or bench["device"] != "cuda":
            continue
        mismatch = _llama_1p3b_mismatch(bench)
        if mismatch:
            return f"unmeasured: not the recipe's shape ({mismatch})", None
        base, *others = result["layouts"]
        hybrid = [row for row in others if "S" in row["layout"] and "D" in row["layout"]
                  and LLAMA_1P3B_32K["layout"].startswith(row["layout"])]
        if set(base["layout"]) == {"D"} and hybrid:
            row = hybrid[0]
            return (f"{row['median_speedup']:.2f}x ({row['layout']} vs {base['layout']}; best step "
                    f"{row['measured_speedup']:.2f}x)", row["median_speedup"] >= 2)
    return "unmeasured", None


def targets(rows: list[dict], training: list | None) -> list[dict]:
    """Each target of TARGETS with its measured value and whether it is met (None: unmeasured)."""
    def f_b(step, method):
        return {r["seq"]: r["fwd_bwd_ms"] for r in rows if r["step"] == step and r["method"] == method
                and "error" not in r and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]}        # NaN: forward only
    s2, flash = f_b("attention_s2", "s2_triton"), f_b("attention_s2", "sdpa_flash")
    flex = f_b("attention_s2", "flex_attention")
    dense, dense_flash = f_b("attention_dense", "s2_triton"), f_b("attention_dense", "sdpa_flash")
    out = []
    if 65536 in s2 and 65536 in flash:
        ratio = flash[65536] / s2[65536]
        out.append((f"{ratio:.2f}x", ratio >= 8))
    else:
        out.append(("unmeasured", None))
    common = sorted(set(dense) & set(dense_flash))
    if common:
        worst = max(dense[n] / dense_flash[n] for n in common)
        out.append((f"{worst:.2f}x the time of flash (worst of {', '.join(f'{n // 1024}k' for n in common)})",
                    worst <= 1.15))
    else:
        out.append(("unmeasured", None))
    common = sorted(set(s2) & set(flex))
    if common:
        out.append((", ".join(f"{n // 1024}k: {flex[n] / s2[n]:.2f}x" for n in common),
                    all(s2[n] < flex[n] for n in common)))
    else:
        out.append(("unmeasured", None))
    out.append(_training_target(training))
    return [{"target": name, "bar": bar, "measured": value, "met": met}
            for (name, bar), (value, met) in zip(TARGETS, out)]


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def _correctness(tests: dict | None) -> list[str]:
    if tests is None:
        return ["", "`pytest -m gpu`: no JUnit XML (the step did not run or was killed before writing it)."]
    c = tests["counts"]
    interrupted = f", {c['interrupted']} interrupted" if c["interrupted"] else ""
    lines = ["", f"`pytest -m gpu`: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped{interrupted}."]
    if tests["failed"]:
        lines += ["", *_table(["failed test", "message"], [[n, m] for n, m in tests["failed"].items()])]
    lines += ["", f"Training checks ({ENGINE_TESTS}):", "",
              *_table(["test", "outcome"], [[n, o] for n, o in tests["engine_tests"].items()] or [["none ran", "-"]])]
    return lines


def _speed(s: dict) -> list[str]:
    lines = ["", f"Attention, {s['attention_shape'] or 'unmeasured'}; the median of the timed calls after a "
                 "warm-up; TFLOP/s on the computed blocks; speed-up over the reference (SDPA flash on a GPU, "
                 "SDPA as PyTorch dispatches it on a CPU):", ""]
    lines += _table(["pattern", "seq", "method", "fwd ms", "bwd ms", "f+b ms", "TFLOP/s", "x ref f+b"],
                    [[r["pattern"], r["seq"], r["method"], *(
                        [r["fwd_ms"], r["bwd_ms"], r["fwd_bwd_ms"], r["tflops"], r["speedup_fwd_bwd_vs_ref"]]
                        if "error" not in r else [f"failed: {r['error']}", None, None, None, None])]
                     for r in s["attention"]] or [["unmeasured", *[None] * 7]])
    layers = "/".join(map(str, sorted({r["layers"] for r in s["training"]})))
    model = ("" if not s["training"] else f", {layers} layers, bf16 on one GPU"
             if all(r["device"] == "cuda" for r in s["training"]) else f", {layers} layers of a small model in fp32 "
             "on the CPU (a dry run)")
    lines += ["", f"Training step (forward+backward, no optimizer){model}; speed-up over the first layout from "
                  "the best and from the median step:", ""]
    lines += _table(["seq", "device", "layout", "tokens/s", "TFLOP/s", "MFU", "speed-up", "(median)", "FLOPs model"],
                    [[r["seq"], r["device"], r["layout"], r["tokens_per_s"], r["tflops_per_s"], r["mfu"],
                      r["measured_speedup"], r["median_speedup"], r["predicted_speedup"]] for r in s["training"]]
                    or [["unmeasured", *[None] * 8]])
    lines += ["", *_table(["target", "bar", "measured", "met"],
                          [[t["target"], t["bar"], t["measured"], {True: "yes", False: "NO", None: "-"}[t["met"]]]
                           for t in s["targets"]])]
    return lines


def markdown(s: dict) -> str:
    env = s["environment"]
    lines = [f"### GPU check, {' and '.join(s['parts'])}, {env['date']}", "",
             f"Device: {env['gpu']}; Python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
             f"megatron-core {env['megatron-core']}, pytest-xdist {env['pytest-xdist']}, "
             f"pytest-timeout {env['pytest-timeout']}.", "",
             *_table(["step", "status", "s", "detail"],
                     [[st["step"], st["status"], st["seconds"], st["detail"]] for st in s["steps"]] or [["none", *[None] * 3]])]
    if "correctness" in s["parts"]:
        lines += _correctness(s["pytest_gpu"])
    if "speed" in s["parts"]:
        lines += _speed(s)
    return "\n".join(lines) + "\n"


def summarize(directory: Path, parts: list[str]) -> dict:
    steps = [json.loads(line) for line in (directory / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (directory / "steps.jsonl").exists() else []
    summary = {"parts": parts, "environment": environment(), "steps": steps}
    if "correctness" in parts:
        summary["pytest_gpu"] = pytest_results(directory / "pytest_gpu.xml")
    if "speed" in parts:
        sparse = _load(directory / "attention_s2.json")
        rows = attention_rows(sparse, "attention_s2") + attention_rows(_load(directory / "attention_dense.json"),
                                                                        "attention_dense")
        training = _load(directory / "training_32k.json")
        summary |= {"attention_shape": attention_shape(sparse), "attention": rows, "training": training_rows(training),
                    "targets": targets(rows, training)}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--part", choices=["correctness", "speed"], help="default: both")
    args = p.parse_args(argv)
    summary = summarize(args.directory, [args.part] if args.part else ["correctness", "speed"])
    (args.directory / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (args.directory / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
