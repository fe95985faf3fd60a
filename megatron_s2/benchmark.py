"""Forward + backward step time and peak memory of GPT models that differ only in their hybrid
layout, next to the speed-up the FLOPs model predicts.

Each layout runs in its own fresh (spawned) process: peak memory is then a per-layout high-water
mark (on CPU the process's own peak RSS, VmHWM; on CUDA ``max_memory_allocated``), and no layout inherits
another's allocator state. Layouts alternate over ``rounds`` (ABAB...), so load from other
processes on a shared machine falls on all of them alike; the load average is recorded. The step
is forward, loss, backward (no optimizer), with the same weights and tokens for every layout. The
model is the trainer's kind (RMSNorm, no linear biases, SwiGLU optional); it runs in fp32 on CPU and
in bf16 on CUDA (the precision GPU training uses; fp32 would leave the tensor cores idle), with
Megatron's CUDA RNG tracker seeded as the trainer seeds it. MFU is the achieved TFLOP/s (FLOPs model,
computed blocks only) over the device's dense bf16 peak, when a peak is given.
Speed-ups are given from the best (minimum) step time, the least disturbed by other processes,
and from the median over all timed steps after warm-up. ``run_sweep`` repeats the comparison at
several sequence lengths (same model) for the speed-up-vs-length table and figure.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig
from s2attn.benchmark import peak_rss_bytes

from .config import S2AttentionConfig, validate_hybrid_model
from .flops import training_flops_per_token
from .model import build_gpt_model
from .parallel import model_parallel_session


@dataclass(frozen=True)
class HybridStepBenchmark:
    """What to measure: one model shape, several layouts."""

    layouts: tuple[str, ...] = ("DDDD", "DSSS")
    """Layouts to compare; the first is the baseline of the speed-ups."""
    hidden_size: int = 256
    """Model width."""
    num_attention_heads: int = 8
    """Query heads."""
    num_query_groups: int | None = None
    """kv heads (GQA); None means as many as query heads."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 * hidden_size."""
    swiglu: bool = False
    """Gated SiLU MLP (Llama); GELU otherwise."""
    vocab_size: int = 1024
    """Vocabulary; small so the logits do not hide the attention."""
    seq_length: int = 8192
    """Tokens per sequence."""
    micro_batch_size: int = 1
    """Sequences per step."""
    s2: S2AttentionConfig = field(default_factory=lambda: S2AttentionConfig(
        block_size=64, local_blocks=8, vert_stride=8))
    """The S2 pattern of the S layers."""
    warmup_steps: int = 1
    """Untimed steps first (allocator and kernel caches)."""
    steps: int = 3
    """Timed steps per round."""
    rounds: int = 2
    """Fresh processes per layout, alternating between layouts."""
    device: str = "cpu"
    """"cpu" (fp32) or "cuda" (bf16)."""
    peak_tflops: float | None = None
    """Dense bf16 peak TFLOP/s of one device, for MFU; None: no MFU."""

    def __post_init__(self) -> None:
        if not self.layouts:
            raise ValueError("layouts must name at least one layout")
        for layout in self.layouts:     # the model checks, before any process starts
            validate_hybrid_model(num_layers=len(self.layouts[0]), num_attention_heads=self.num_attention_heads,
                                  num_query_groups=self.num_query_groups, tensor_model_parallel_size=1,
                                  seq_length=self.seq_length, s2=self.s2, layout=layout)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name, least in (("warmup_steps", 0), ("steps", 1), ("rounds", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")

    def transformer_config(self, num_layers: int) -> TransformerConfig:
        cuda = self.device == "cuda"
        dtype = torch.bfloat16 if cuda else torch.float32
        return TransformerConfig(
            num_layers=num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size, normalization="RMSNorm", add_bias_linear=False,
            gated_linear_unit=self.swiglu, activation_func=F.silu if self.swiglu else F.gelu,
            hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype, bf16=cuda,
            use_cpu_initialization=not cuda,
            cuda_graph_scope=[])    # the whole layer; Megatron's default, "full", warns that it is deprecated


@dataclass
class LayoutMeasurement:
    """One layout's step."""

    layout: str
    step_times_s: list[float]
    """Every timed step."""
    median_step_s: float
    best_step_s: float
    peak_memory_bytes: int
    """CPU: peak RSS of the process; CUDA: peak allocated memory."""
    step_memory_bytes: int
    """Peak memory above what the built model held before its first step."""
    training_flops_per_token: float
    """FLOPs model, only the computed attention blocks."""


def _peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def measure_layout(bench: HybridStepBenchmark, layout: str) -> LayoutMeasurement:
    """Build the model for ``layout`` in this process and time its steps."""
    with model_parallel_session(1):
        config = bench.transformer_config(len(layout))
        torch.manual_seed(0)
        if bench.device == "cuda":
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        model = build_gpt_model(config, bench.s2, layout, vocab_size=bench.vocab_size,
                                max_sequence_length=bench.seq_length).to(bench.device)
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, bench.vocab_size, (bench.micro_batch_size, bench.seq_length + 1),
                               generator=generator).to(bench.device)
        position_ids = torch.arange(bench.seq_length, device=bench.device).expand(bench.micro_batch_size, -1)
        sync = torch.cuda.synchronize if bench.device == "cuda" else (lambda: None)
        if bench.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _peak_memory("cpu")
        times = []
        for step in range(bench.warmup_steps + bench.steps):
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
            loss.backward()
            sync()
            if step >= bench.warmup_steps:
                times.append(time.perf_counter() - start)
        peak = _peak_memory(bench.device)
    flops = training_flops_per_token(config, layout, bench.s2, bench.seq_length, bench.vocab_size)
    return LayoutMeasurement(layout=layout, step_times_s=times, median_step_s=statistics.median(times),
                             best_step_s=min(times), peak_memory_bytes=peak, step_memory_bytes=peak - before,
                             training_flops_per_token=flops.sparse)


def _combine(runs: list[LayoutMeasurement]) -> LayoutMeasurement:
    times = [t for run in runs for t in run.step_times_s]
    return LayoutMeasurement(layout=runs[0].layout, step_times_s=times,
                             median_step_s=statistics.median(times), best_step_s=min(times),
                             peak_memory_bytes=max(run.peak_memory_bytes for run in runs),
                             step_memory_bytes=max(run.step_memory_bytes for run in runs),
                             training_flops_per_token=runs[0].training_flops_per_token)


def run_benchmark(bench: HybridStepBenchmark) -> dict:
    """Measure every layout in fresh processes; speed-ups are against ``bench.layouts[0]``.

    Returns a JSON-ready dict: the benchmark settings, the load average before and after, one
    entry per layout, and per layout its measured speed-ups (best and median step), the FLOPs
    model's predicted speed-up and the best speed-up's fraction of it, tokens/s, TFLOP/s and MFU
    (None without ``bench.peak_tflops``), all from the best step.
    """
    context = multiprocessing.get_context("spawn")
    load_before = os.getloadavg()
    runs = {layout: [] for layout in bench.layouts}
    for _ in range(bench.rounds):
        for layout in bench.layouts:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                runs[layout].append(pool.submit(measure_layout, bench, layout).result())
    measurements = [_combine(runs[layout]) for layout in bench.layouts]
    base = measurements[0]
    rows = []
    for m in measurements:
        measured = base.best_step_s / m.best_step_s
        predicted = base.training_flops_per_token / m.training_flops_per_token
        tokens_per_s = bench.seq_length * bench.micro_batch_size / m.best_step_s
        tflops = m.training_flops_per_token * tokens_per_s / 1e12
        rows.append({**asdict(m), "measured_speedup": measured,
                     "median_speedup": base.median_step_s / m.median_step_s,
                     "predicted_speedup": predicted, "fraction_of_predicted": measured / predicted,
                     "tokens_per_s": tokens_per_s, "tflops_per_s": tflops,
                     "mfu": tflops / bench.peak_tflops if bench.peak_tflops else None})
    return {"benchmark": asdict(bench), "torch_threads": torch.get_num_threads(),
            "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]], "layouts": rows}


def sweep(bench: HybridStepBenchmark, seq_lengths: list[int]) -> list[HybridStepBenchmark]:
    """``bench`` at each sequence length, shortest first, every one checked (ValueError)."""
    if not seq_lengths:
        raise ValueError("seq_lengths must name at least one length")
    for length in seq_lengths:
        if length < 1 or length % bench.s2.block_size:
            raise ValueError(f"seq_lengths entry {length} must be a positive multiple of "
                             f"s2.block_size ({bench.s2.block_size})")
    return [replace(bench, seq_length=length) for length in sorted(seq_lengths)]


def run_sweep(bench: HybridStepBenchmark, seq_lengths: list[int]) -> list[dict]:
    """``run_benchmark`` at each sequence length (the rest of ``bench`` unchanged), shortest first."""
    return [run_benchmark(b) for b in sweep(bench, seq_lengths)]


def format_sweep_table(results: list[dict]) -> str:
    """One row per (sequence length, layout): tokens/s, step times, memory, speed-ups, TFLOP/s, MFU."""
    header = (f"{'seq':>6} {'layout':>8} {'tokens/s':>9} {'best s':>7} {'median s':>8} {'peak MiB':>9} "
              f"{'step MiB':>9} {'speed-up':>9} {'(median)':>9} {'predicted':>9} {'of pred.':>8} "
              f"{'TFLOP/s':>8} {'MFU':>6} {'load 1m':>11}")
    lines = [header, "-" * len(header)]
    for result in results:
        load = "{:.1f}->{:.1f}".format(*result["load_average_1m_before_after"])
        for r in result["layouts"]:
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            lines.append(f"{result['benchmark']['seq_length']:>6} {r['layout']:>8} {r['tokens_per_s']:9.0f} "
                         f"{r['best_step_s']:7.3f} {r['median_step_s']:8.3f} "
                         f"{r['peak_memory_bytes'] / 2**20:9.0f} {r['step_memory_bytes'] / 2**20:9.0f} "
                         f"{r['measured_speedup']:8.2f}x {r['median_speedup']:8.2f}x "
                         f"{r['predicted_speedup']:8.2f}x {r['fraction_of_predicted']:8.2f} "
                         f"{r['tflops_per_s']:8.4f} {mfu:>6} {load:>11}")
    steps = len(results[0]["layouts"][0]["step_times_s"])
    lines.append(f"(forward+backward step, no optimizer; best and median of {steps} steps per layout and "
                 f"length; speed-up, fraction of predicted and TFLOP/s from the best step, over the first "
                 f"layout; {results[0]['torch_threads']} torch threads)")
    return "\n".join(lines)
