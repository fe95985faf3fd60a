"""Loss curves of several training runs side by side and a table of their final losses.

    python scripts/compare_runs.py runs/quality_dense runs/quality_hybrid --labels dense hybrid

Each argument is a run directory (or its metrics.jsonl); the first run is the baseline of the
relative column. The training loss is the trainer's logged loss (the mean over each log interval
of logging.interval steps), the validation loss its validation records. ``--offsets`` shifts each
run's iterations, e.g. to draw a run started from another's checkpoint (checkpoint.init_from) after
its parent's steps.
"""
import argparse
import json
import os

from megatron_s2.accelerators import quiet_fallback_notices

quiet_fallback_notices()        # before Megatron is imported

from megatron_s2.evaluation.compare import format_summary, read_metrics, summarize  # noqa: E402
from megatron_s2.plots import plot_loss_curves  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    p.add_argument("--labels", nargs="+", default=None, help="one per run (default: directory names)")
    p.add_argument("--figure", default=os.path.join("runs", "compare_runs.png"), help="PNG output path ('' for none)")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    p.add_argument("--offsets", nargs="+", type=int, default=None, help="one per run: added to its iterations")
    p.add_argument("--title", default=None, help="the figure's title (default: 'loss of' and the labels)")
    a = p.parse_args(argv)
    for name, given in (("--labels", a.labels), ("--offsets", a.offsets)):
        if given is not None and len(given) != len(a.runs):
            raise ValueError(f"{name} has {len(given)} entries but {len(a.runs)} runs were given")
    labels = a.labels or [os.path.basename(os.path.normpath(r)) for r in a.runs]
    offsets = a.offsets or [0] * len(a.runs)
    runs = {label: [{**r, "iteration": r["iteration"] + offset} for r in read_metrics(path)]
            for label, path, offset in zip(labels, a.runs, offsets)}
    rows = summarize(runs)
    print(format_summary(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.figure:
        os.makedirs(os.path.dirname(os.path.abspath(a.figure)), exist_ok=True)
        print(f"wrote {plot_loss_curves(a.figure, runs, title=a.title)}")


if __name__ == "__main__":
    main()
