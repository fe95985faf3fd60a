"""Run outputs from rank 0: console line, metrics.jsonl, wandb, resolved config, layout picture.

"loss" is the same number everywhere (step line, final line, metrics.jsonl, wandb,
scripts/compare_runs.py): the mean training loss of the logging.interval steps that end at the
logged iteration (fewer at the end of a run or launch).

metrics.jsonl holds each iteration once: a launch that resumes from iteration N first drops the
records after N (written by a launch that stopped after its last checkpoint) and appends its own.

Per log interval one record: iteration, loss, lr, grad_norm, tokens_per_sec,
tflops_per_device (sparse-aware FLOPs model: only the attention blocks the layout computes; with
packed documents only each step's within-document blocks),
tflops_dense_equiv_per_device (the same model counted dense, labelled as such), mfu (from
tflops_per_device; None without a known peak), step_time, memory_gib (CUDA peak allocated, or
the process's peak RSS on CPU), eta_s. Validation records carry iteration and val_loss; a step
skipped for NaN/Inf writes iteration, skipped_steps and skipped_in_a_row (and no loss). wandb
gets the same records (``wandb_run``).
"""
from __future__ import annotations

import json
import os
import resource
import time

import torch
import yaml

from ..flops import FlopsPerToken
from ..plots import plot_layout
from . import wandb_run
from .config import PretrainConfig, to_plain_dict

# Dense bf16 peak TFLOP/s of known accelerators (for MFU), matched against the device name.
PEAK_TFLOPS_BF16 = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "B200": 2250.0, "L40S": 362.1,
                    "A10G": 125.0, "L4": 121.0}


def say(text: str) -> None:
    """One console line from rank 0 ($RANK; usable before the process group exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def _short(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def peak_tflops_per_device(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS_BF16.items():
            if key in name:
                return value
    return None


def memory_gib() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux


class MetricsLogger:
    """Console + metrics.jsonl + wandb on rank 0; a no-op elsewhere. ``flops`` (the run's training
    FLOPs per token of a whole, unpacked sequence) goes into the wandb config; the logged TFLOP/s
    use each step's own figure (``step``)."""

    def __init__(self, cfg: PretrainConfig, *, enabled: bool, flops, world_size: int,
                 start_iteration: int) -> None:
        self.cfg, self.enabled, self.world_size = cfg, enabled, world_size
        self.peak = peak_tflops_per_device(cfg.logging.peak_tflops_per_device)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        self.start_iteration = start_iteration
        self.window_losses: list[float] = []
        self.window_flops: list[FlopsPerToken] = []
        self.window_time = 0.0
        self.run_start = time.time()
        self.logged_loss = None     # the loss of the last record written (every rank keeps it)
        self.wandb = None
        self.offline_run = None     # the offline wandb run's directory, known after finish()
        if not enabled:
            return
        os.makedirs(cfg.run.dir, exist_ok=True)
        plain_config = to_plain_dict(cfg)
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            yaml.safe_dump(plain_config, f, sort_keys=False)
        history = _records_up_to(os.path.join(cfg.run.dir, "metrics.jsonl"), start_iteration)
        self.jsonl = open(os.path.join(cfg.run.dir, "metrics.jsonl"), "a")
        self.pattern_path = os.path.join(cfg.run.dir, "attention_pattern.png")
        m = cfg.model
        plot_layout(self.pattern_path, s2=cfg.attention.s2, num_heads=m.num_attention_heads,
                    num_kv_heads=m.num_query_groups, layout=cfg.attention.layout, seq_length=cfg.train.seq_length)
        self.wandb = wandb_run.start(cfg, {**plain_config, "flops_per_token": flops.sparse,
                                           "flops_per_token_dense_equivalent": flops.dense_equivalent},
                                     history, self.pattern_path, start_iteration)

    def _write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            wandb_run.log(self.wandb, record)

    def step(self, iteration: int, loss: float, lr: float, grad_norm: float, step_time: float,
             flops: FlopsPerToken) -> None:
        """Record one optimizer step (``flops``: training FLOPs per token of its global batch);
        write a record every logging.interval steps."""
        self.window_losses.append(loss)
        self.window_flops.append(flops)
        self.window_time += step_time
        if iteration % self.cfg.logging.interval and iteration != self.cfg.train.iters:
            return
        self.logged_loss = sum(self.window_losses) / len(self.window_losses)
        if self.enabled:
            self._log_window(iteration, lr, grad_norm)
        self.window_losses, self.window_flops, self.window_time = [], [], 0.0

    def _log_window(self, iteration: int, lr: float, grad_norm: float) -> None:
        steps = len(self.window_losses)
        mean_step = self.window_time / steps
        tokens_per_sec = self.tokens_per_step / mean_step
        # Every step has the same tokens: the window's FLOPs per token is the mean over its steps.
        tflops = sum(f.sparse for f in self.window_flops) / steps * tokens_per_sec / self.world_size / 1e12
        tflops_dense = (sum(f.dense_equivalent for f in self.window_flops) / steps * tokens_per_sec
                        / self.world_size / 1e12)
        mfu = tflops / self.peak if self.peak else None
        elapsed = time.time() - self.run_start
        eta = elapsed / (iteration - self.start_iteration) * (self.cfg.train.iters - iteration)
        record = {"iteration": iteration, "loss": self.logged_loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                  "tflops_per_device": tflops, "tflops_dense_equiv_per_device": tflops_dense,
                  "mfu": mfu, "step_time": mean_step, "memory_gib": memory_gib(), "eta_s": eta}
        self._write(record)
        width = len(str(self.cfg.train.iters))
        print(f"iter {iteration:>{width}}/{self.cfg.train.iters} | loss {record['loss']:.4f} | lr {lr:.2e} | "
              f"grad {grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s | {tflops:.3g} TFLOP/s/dev | MFU "
              + (f"{mfu:.1%}" if mfu is not None else "n/a") +
              f" | mem {record['memory_gib']:.2f} GiB | {mean_step:.3f} s/it | ETA {eta:.0f}s", flush=True)

    def validation(self, iteration: int, val_loss: float) -> None:
        if self.enabled:
            self._write({"iteration": iteration, "val_loss": val_loss})
            print(f"iter {iteration} | validation loss {val_loss:.4f}", flush=True)

    def skipped(self, iteration: int, total: int, in_a_row: int, report: str) -> None:
        """A step dropped for a non-finite loss or gradient (train.on_non_finite=skip)."""
        if self.enabled:
            self._write({"iteration": iteration, "skipped_steps": total, "skipped_in_a_row": in_a_row})
            print(f"iter {iteration} | non-finite loss or grad norm: step skipped ({in_a_row} in a row, "
                  f"limit {self.cfg.train.max_consecutive_skips}) | {report}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def finish(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.wandb is not None:
            self.offline_run = wandb_run.finish(self.wandb)

    def summary(self, *, steps: int, seconds: float, val_loss: float | None, checkpoint: str | None,
                stopped: str | None) -> None:
        """The run's last console line (after ``finish``): steps and tokens of this launch, wall
        time, the last logged loss and validation loss, why it stopped early (``stopped``) and where
        the checkpoint, metrics, picture and wandb run are."""
        if not self.enabled:
            return
        t = self.cfg.train
        loss = self.logged_loss
        parts = [f"{f'stopped ({stopped})' if stopped else 'done'}: {steps} steps, "
                 f"{steps * self.tokens_per_step:,} tokens in {_duration(seconds)}"
                 + (f" | loss {loss:.4f}" if loss is not None else "")
                 + (f", validation {val_loss:.4f}" if val_loss is not None else ""),
                 f"checkpoint {_short(checkpoint) if checkpoint else 'none'}",
                 f"metrics {_short(self.jsonl.name)}", f"picture {_short(self.pattern_path)}"]
        if self.wandb is not None:
            offline = self.offline_run
            parts.append(f"wandb offline {_short(offline)} (upload: wandb sync {_short(offline)})"
                         if offline else f"wandb {self.wandb.url}")
        if steps and self.start_iteration + steps < t.iters:
            parts.append("rerun the same command to resume")
        print(" | ".join(parts), flush=True)


def _records_up_to(path: str, iteration: int) -> list[dict]:
    """The records of metrics.jsonl at ``path`` up to ``iteration``, the file rewritten (atomically)
    to hold only those: the later ones came from a launch that stopped after its last checkpoint,
    and the resumed run writes its own."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r["iteration"] <= iteration]
    if len(kept) < len(records):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
    return kept
