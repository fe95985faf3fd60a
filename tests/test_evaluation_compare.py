"""compare_runs on fabricated metrics.jsonl files: final losses, the relative column, resumes."""
import json
import subprocess
import sys

import pytest

from megatron_s2.evaluation.compare import format_summary, read_metrics, summarize


def write_run(directory, records):
    directory.mkdir()
    with open(directory / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(directory)


def test_summary_takes_the_last_records_and_compares_to_the_first_run(tmp_path):
    dense = write_run(tmp_path / "dense", [
        {"iteration": 10, "loss": 3.0, "tokens_per_sec": 100.0},
        {"iteration": 10, "val_loss": 2.9},
        {"iteration": 20, "loss": 2.0, "tokens_per_sec": 300.0},
        {"iteration": 20, "val_loss": 2.0}])
    # A resumed run rewrote iteration 20: the later records win.
    hybrid = write_run(tmp_path / "hybrid", [
        {"iteration": 20, "loss": 9.0, "tokens_per_sec": 1.0},
        {"iteration": 20, "val_loss": 9.0},
        {"iteration": 20, "loss": 2.1, "tokens_per_sec": 400.0},
        {"iteration": 20, "val_loss": 2.1}])
    rows = summarize({"dense": read_metrics(dense), "hybrid": read_metrics(hybrid)})
    assert [r["run"] for r in rows] == ["dense", "hybrid"]
    assert rows[0]["final_val_loss"] == 2.0 and rows[0]["val_loss_vs_first"] == 0.0
    assert rows[0]["tokens_per_sec"] == 200.0
    assert rows[1]["final_train_loss"] == 2.1 and rows[1]["final_val_loss"] == 2.1
    assert rows[1]["val_loss_vs_first"] == pytest.approx(0.05)
    assert "+5.00%" in format_summary(rows)


def test_missing_metrics_name_the_run(tmp_path):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        read_metrics(str(tmp_path))


def test_script_prints_the_table_and_writes_the_figure(tmp_path):
    a = write_run(tmp_path / "a", [{"iteration": 5, "loss": 1.0}, {"iteration": 5, "val_loss": 1.5}])
    b = write_run(tmp_path / "b", [{"iteration": 5, "loss": 1.2}, {"iteration": 5, "val_loss": 1.2}])
    figure = tmp_path / "cmp.png"
    out = subprocess.run([sys.executable, "scripts/compare_runs.py", a, b, "--labels", "A", "B",
                          "--figure", str(figure)], capture_output=True, text=True, timeout=120, check=True)
    assert "-20.00%" in out.stdout
    assert "train loss: the last logged (the mean over its log interval); val loss: the last validation" in out.stdout
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_offsets_shift_a_continued_run_after_its_parent(tmp_path):
    a = write_run(tmp_path / "a", [{"iteration": 5, "loss": 1.0}])
    b = write_run(tmp_path / "b", [{"iteration": 2, "loss": 0.9}, {"iteration": 2, "val_loss": 1.1}])
    table = tmp_path / "table.json"
    subprocess.run([sys.executable, "scripts/compare_runs.py", a, b, "--offsets", "0", "5", "--figure", "",
                    "--json", str(table)], capture_output=True, text=True, timeout=120, check=True)
    assert [row["iteration"] for row in json.loads(table.read_text())] == [5, 7]
