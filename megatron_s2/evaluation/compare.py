"""Compare training runs from their metrics.jsonl (as the trainer writes it, one JSON record per
line: step records with "loss", validation records with "val_loss").

``summarize`` gives per run the final validation loss (the last validation record), the final
training loss (the last logged loss: the mean over the log interval that ends there), the
iteration reached and mean tokens/s, and the final validation loss relative to the first
(baseline) run. ``format_summary`` says so under its table.
"""
from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file, or of <path>/metrics.jsonl for a run directory."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"run {path!r}: no metrics.jsonl there")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"run {path!r}: metrics.jsonl holds no records")
    # The trainer writes each iteration once; files from before it did repeat the iterations a
    # resumed run wrote again: keep the last record written for each (iteration, kind).
    latest = {}
    for r in records:
        latest[(r["iteration"], "val_loss" in r)] = r
    return [latest[key] for key in sorted(latest)]


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per run (in the given order); the first run is the baseline of ``val_loss_vs_first``."""
    if not runs:
        raise ValueError("runs must hold at least one run")
    rows = []
    for label, records in runs.items():
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "val_loss" in r]
        rows.append({
            "run": label,
            "iteration": max(r["iteration"] for r in records),
            "final_train_loss": steps[-1]["loss"] if steps else None,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "tokens_per_sec": (sum(r["tokens_per_sec"] for r in steps) / len(steps)
                               if steps and all("tokens_per_sec" in r for r in steps) else None)})
    base = rows[0]["final_val_loss"]
    for row in rows:
        row["val_loss_vs_first"] = (row["final_val_loss"] / base - 1.0
                                    if base and row["final_val_loss"] is not None else None)
    return rows


def format_summary(rows: list[dict]) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "-"
    width = max(len("run"), *(len(r["run"]) for r in rows))
    header = (f"{'run':<{width}} {'iter':>6} {'train loss':>11} {'val loss':>9} "
              f"{'val vs ' + rows[0]['run'][:12]:>19} {'tokens/s':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['run']:<{width}} {r['iteration']:>6} {num(r['final_train_loss'], '11.4f')} "
                     f"{num(r['final_val_loss'], '9.4f')} {num(r['val_loss_vs_first'], '+19.2%')} "
                     f"{num(r['tokens_per_sec'], '9.0f')}")
    lines.append(f"train loss: the last logged (the mean over its log interval); val loss: the last "
                 f"validation; val vs {rows[0]['run']}: relative to that run's val loss")
    return "\n".join(lines)
