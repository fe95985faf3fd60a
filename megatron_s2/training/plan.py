"""The memory and speed plan of a run, before launch: will it fit, and what would make it fit.

``make_plan(composed, world_size, ...)`` validates a composed recipe for the target machine
(``validate(check_environment=False)``: no GPU, dataset or tokenizer needed here), builds nothing
(no process group, no tensor), and counts per rank, for every pipeline stage:

- parameters (exactly, ``megatron_s2.memory.parameters_per_rank``), gradients and optimizer state
  as the engine holds them: the cuda path (Megatron DDP, fp32 gradient buffer, distributed
  optimizer over dp x cp: fp32 main parameters in bf16 runs and Adam's two moments) or the cpu
  path (fp32 parameters, gradients and AdamW moments, a flat all-reduce buffer under dp);
- activations per layer (``megatron_s2.memory``: S layers as they are, no [s, s] scores) under
  every recomputation setting and under the configured one, times the micro batches a stage holds
  at once (1F1B), plus what the embedding, output layer and loss keep;
- transients: the logits beside the loss's fp32 copy, the largest recomputed unit rebuilt in the
  backward, the Triton backward's dK/dV partial buffer (from s2attn's own work lists), the
  gradient of the whole-sequence K/V under context parallelism;

and the peak against the memory given. It refuses nothing: a run that does not fit gets "does not
fit" and the first single change (recomputation, micro batch, tp, cp) that would make it fit. The
speed part: FLOPs per step (``megatron_s2.flops``, sparse-aware; recomputation not counted, as in
Megatron-LM's MFU) and the tokens/s a given MFU means.

``check_fits`` is the trainer's one-line refusal of a run whose parameters, gradients, optimizer
state and activations cannot fit the device it was given.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from megatron_s2 import training_flops_per_token
from megatron_s2.memory import (RECOMPUTE_SETTINGS, Shape, cp_exchange, dkdv_partials, gib, in_flight_micro_batches,
                                layer_activations, logits_bytes, outside_layers, parameters_per_rank,
                                stage_activations)

from .config import Device, PretrainConfig, Precision, to_plain_dict, validate
from .data import load_tokenizer
from .errors import ConfigError
from .loop import padded_vocab_size, transformer_config
from .metrics import PEAK_TFLOPS_BF16

DEFAULT_PEAK_TFLOPS = PEAK_TFLOPS_BF16["H100"]


@dataclass(frozen=True)
class StageMemory:
    """Bytes one rank of a pipeline stage holds at its peak."""

    stage: int
    parameters: int
    """Parameter elements of this rank."""
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    engine_buffers: int
    """The cpu path's flat gradient all-reduce buffer (dp x cp > 1)."""
    layers: int
    """Activations the stage's layers keep, all micro batches in flight."""
    in_flight: int
    outside: int
    """Activations outside the layers (embedding, output layer, loss), per micro batch in flight."""
    transient: dict
    """The largest short-lived buffers, by name; the peak adds the largest of (logits) and (the
    backward of one layer: rebuilt unit + dK/dV partials + K/V gradient)."""

    @property
    def static(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.engine_buffers

    @property
    def peak(self) -> int:
        t = self.transient
        backward = t.get("recomputed_unit", 0) + t.get("dkdv_partials", 0) + t.get("cp_kv_gradient", 0)
        return self.static + self.layers + self.in_flight * self.outside + max(t.get("logits", 0), backward)


@dataclass(frozen=True)
class Plan:
    cfg: PretrainConfig
    world_size: int
    tokenizer_vocab: int
    """The tokenizer's vocabulary; the model's is padded (``padded_vocab_size``)."""
    capacity: int
    """Bytes of memory per rank the plan is checked against."""
    stages: list[StageMemory]
    per_layer: dict
    """{setting: {"S"|"D": bytes per micro batch}} for every RECOMPUTE_SETTINGS."""
    cp: dict
    flops_per_token: object
    micro_batches: int

    @property
    def vocab_size(self) -> int:
        return padded_vocab_size(self.tokenizer_vocab, self.cfg)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.capacity


def _stage_layout(cfg: PretrainConfig, stage: int) -> str:
    per = cfg.model.num_layers // cfg.parallel.pp
    return cfg.attention.layout[stage * per:(stage + 1) * per]


def plan_of(cfg: PretrainConfig, world_size: int, tokenizer_vocab: int, capacity: int) -> Plan:
    """The plan of a validated config (see the module docstring)."""
    config = transformer_config(cfg)
    t, p = cfg.train, cfg.parallel
    vocab_size = padded_vocab_size(tokenizer_vocab, cfg)
    device = "cuda" if cfg.train.device == Device.cuda else "cpu"
    shape = Shape(t.seq_length, t.micro_batch_size, device=device, packed=cfg.data.reset_attention_mask)
    dp = world_size // (p.tp * p.cp * p.pp)
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    bf16 = t.precision == Precision.bf16
    cp = cp_exchange(config, cfg.attention.s2, shape)
    dkdv = dkdv_partials(config, cfg.attention.s2, shape) if "S" in cfg.attention.layout else 0
    share = cfg.model.share_embeddings_and_output_weights
    stages = []
    for stage in range(p.pp):
        first, last = stage == 0, stage == p.pp - 1
        layout = _stage_layout(cfg, stage)
        n = parameters_per_rank(config, vocab_size, num_layers=len(layout), pre_process=first, post_process=last,
                                share_embeddings_and_output_weights=share)
        if device == "cuda":
            param, grad, optimizer, buffers = (2 if bf16 else 4) * n, 4 * n, (12 if bf16 else 8) * n // (dp * p.cp), 0
        else:
            param, grad, optimizer, buffers = 4 * n, 4 * n, 8 * n, 4 * n if dp * p.cp > 1 else 0
        kept, rebuilt = stage_activations(config, layout, shape)
        in_flight = in_flight_micro_batches(config, micro_batches, stage)
        transient = {"recomputed_unit": rebuilt, "dkdv_partials": dkdv if "S" in layout else 0,
                     "cp_kv_gradient": cp.get("kv_gradient", 0)}
        if last:
            transient["logits"] = logits_bytes(config, vocab_size, shape)
        stages.append(StageMemory(stage, n, param, grad, optimizer, buffers, in_flight * kept, in_flight,
                                  sum(outside_layers(config, vocab_size, shape, pre_process=first,
                                                     post_process=last).values()), transient))
    per_layer = {setting: {kind: sum(layer_activations(config, kind, shape, setting).values()) for kind in "DS"}
                 for setting in RECOMPUTE_SETTINGS}
    flops = training_flops_per_token(config, cfg.attention.layout, cfg.attention.s2, t.seq_length, vocab_size)
    return Plan(cfg, world_size, tokenizer_vocab, capacity, stages, per_layer, cp, flops, micro_batches)


_RESET = ["model.recompute_granularity=null", "model.recompute_method=null", "model.recompute_num_layers=null",
          "model.recompute_modules=null"]


def _knobs(cfg: PretrainConfig, world_size: int) -> list[list[str]]:
    """Single changes to try, cheapest first: selective recomputation (core_attn; with mlp on the
    cuda path), full recomputation by block of 1, 2, 4, ... layers, then of every layer, a smaller
    micro batch, twice the tp, twice the cp. Each as the overrides a user would add."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    per_stage = m.num_layers // p.pp
    options = [["model.recompute_granularity=selective", "model.recompute_modules=[core_attn]"]]
    if t.device == Device.cuda:
        options.append(["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,mlp]"])
    n = 1
    while n < per_stage:
        options.append(["model.recompute_granularity=full", "model.recompute_method=block",
                        f"model.recompute_num_layers={n}"])
        n *= 2
    options.append(["model.recompute_granularity=full", "model.recompute_method=uniform",
                    "model.recompute_num_layers=1"])
    if t.micro_batch_size > 1:
        options.append([f"train.micro_batch_size={t.micro_batch_size // 2}"])
    if 2 * p.tp * p.cp * p.pp <= world_size:
        options += [[f"parallel.tp={2 * p.tp}"], [f"parallel.cp={2 * p.cp}"]]
    return options


def _changed(cfg: PretrainConfig, world_size: int, overrides: list[str]) -> PretrainConfig | None:
    """``cfg`` with command-line style overrides, validated again; None if that refuses it."""
    plain = to_plain_dict(cfg)
    plain["attention"].update(dense_every=None, dense_layers=None)      # the layout is resolved
    reset = _RESET if overrides[0].startswith("model.recompute") else []
    composed = OmegaConf.merge(OmegaConf.structured(PretrainConfig), plain, OmegaConf.from_dotlist(reset + overrides))
    try:
        return validate(composed, world_size=world_size, note=lambda _: None, check_environment=False)
    except ConfigError:
        return None                     # e.g. a tp that does not divide the heads


def fitting_change(plan: Plan) -> tuple[list[str], Plan] | None:
    """The first of ``_knobs`` (as overrides) whose plan fits, with that plan; None if none does."""
    with warnings.catch_warnings():     # Megatron's advice on core_attn under TransformerEngine, for every try
        warnings.filterwarnings("ignore", message="If you are using transformer_engine")
        for overrides in _knobs(plan.cfg, plan.world_size):
            cfg = _changed(plan.cfg, plan.world_size, overrides)
            if cfg is not None:
                other = plan_of(cfg, plan.world_size, plan.tokenizer_vocab, plan.capacity)
                if other.fits:
                    return overrides, other
    return None


def vocabulary(cfg: PretrainConfig, vocab_size: int | None) -> int:
    """The tokenizer's vocabulary (unpadded): ``vocab_size`` when given, else data.tokenizer's when
    it can be read here (ConfigError otherwise, asking for --vocab-size)."""
    if vocab_size is not None:
        return vocab_size
    if cfg.data.tokenizer != "byte" and not os.path.isdir(cfg.data.tokenizer):
        raise ConfigError("data.tokenizer", cfg.data.tokenizer, "is not on this machine; give the vocabulary "
                                                                "with --vocab-size N for the plan")
    return load_tokenizer(cfg.data.tokenizer).vocab_size


def _gib(n: float) -> str:
    return f"{gib(n):.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _recompute_setting(cfg: PretrainConfig) -> str:
    m = cfg.model
    if m.recompute_granularity is None:
        return "none"
    if m.recompute_granularity.value == "selective":
        return "selective " + "+".join(m.recompute_modules or ["core_attn"])
    return f"full, {m.recompute_method.value}, {m.recompute_num_layers} layer(s)"


def verdict(plan: Plan, change: tuple[list[str], Plan] | None) -> str:
    """"fits" or "does not fit" with the peak, and the change that would make it fit."""
    peak = plan.worst.peak
    head = f"peak {_gib(peak)} of {_gib(plan.capacity)} per rank"
    if plan.fits:
        return (f"{head}: fits ({_gib(plan.capacity - peak)} left for what the plan does not count: CUDA "
                "context, NCCL buffers, workspaces, allocator fragmentation)")
    if change is None:
        return f"{head}: does not fit, and no single change of recomputation, micro batch, tp or cp makes it fit"
    overrides, other = change
    return f"{head}: does not fit; it fits with {' '.join(overrides)} (peak {_gib(other.worst.peak)})"


def describe(plan: Plan, change: tuple[list[str], Plan] | None, mfu: float, peak_tflops: float) -> str:
    """The plan as text, one fact per line."""
    cfg, t, p = plan.cfg, plan.cfg.train, plan.cfg.parallel
    dp = plan.world_size // (p.tp * p.cp * p.pp)
    device = cfg.train.device.value
    layout = cfg.attention.layout
    lines = [
        f"plan: {cfg.run.name} on {plan.world_size} {device} ranks of {_gib(plan.capacity)} (dp {dp} x tp {p.tp} x "
        f"cp {p.cp} x pp {p.pp}{', sequence parallel' if p.sequence_parallel else ''}), {t.precision.value}, "
        f"micro batch {t.micro_batch_size} x {t.seq_length} tokens"
        f"{' (one pack)' if cfg.data.reset_attention_mask else ''}, "
        f"global batch {t.global_batch_size} ({plan.micro_batches} micro batches per rank per step)",
        f"model: {cfg.model.num_layers} layers, {layout.count('D')} D + {layout.count('S')} S ({layout}), "
        f"vocabulary {plan.tokenizer_vocab} (padded {plan.vocab_size}); recomputation: {_recompute_setting(cfg)}",
        "activations one layer keeps per micro batch, MiB (by recomputation setting):",
        "  layer " + "".join(f"{s:>15}" for s in RECOMPUTE_SETTINGS)]
    for kind in "DS":
        lines.append(f"  {kind}     " + "".join(f"{_mib(plan.per_layer[s][kind]):>15}" for s in RECOMPUTE_SETTINGS))
    if plan.cp:
        c = plan.cp
        lines.append(f"context parallel, per layer per micro batch: receives {_mib(c['received_sparse'])} MiB of K/V "
                     f"(sparse exchange, S layers) or {_mib(c['received_all_gather'])} MiB (all-gather); keeps the "
                     f"whole sequence's K/V ({_mib(c['kv_gradient'])} MiB, in the layers' figures); its gradient in "
                     "the backward is as large")
    for stage in plan.stages:
        tr = stage.transient
        lines += [
            f"per rank, pipeline stage {stage.stage} ({len(_stage_layout(cfg, stage.stage))} layers):",
            f"  parameters      {_gib(stage.param_bytes):>12}  ({stage.parameters / 1e9:.3f} B on this rank)",
            f"  gradients       {_gib(stage.grad_bytes):>12}",
            f"  optimizer       {_gib(stage.optimizer_bytes):>12}" + (
                f"  (distributed over dp x cp = {dp * p.cp})" if device == "cuda" else "  (AdamW moments)"),
        ]
        if stage.engine_buffers:
            lines.append(f"  all-reduce buf  {_gib(stage.engine_buffers):>12}")
        lines += [
            f"  activations     {_gib(stage.layers + stage.in_flight * stage.outside):>12}  (layers "
            f"{_gib(stage.layers)}, outside the layers {_gib(stage.in_flight * stage.outside)}; "
            f"{stage.in_flight} micro batch(es) in flight)",
            "  transient       " + ", ".join(f"{name.replace('_', ' ')} {_mib(v)} MiB" for name, v in tr.items() if v),
            f"  peak            {_gib(stage.peak):>12}"]
    lines.append(verdict(plan, change))
    tokens = t.global_batch_size * t.seq_length
    flops = plan.flops_per_token
    rate = mfu * plan.world_size * peak_tflops * 1e12 / flops.sparse
    lines.append(f"speed: {flops.sparse * tokens / 1e15:.2f} PFLOP per step ({flops.sparse / 1e9:.2f} GFLOP per "
                 f"token, sparse-aware; with dense attention {flops.predicted_speedup:.2f}x that); "
                 f"{mfu:.0%} MFU at {peak_tflops:g} TFLOP/s per rank needs {rate:,.0f} tokens/s "
                 f"({tokens / rate:.2f} s per step)")
    return "\n".join(lines)


def make_plan(composed: DictConfig, world_size: int, capacity_gib: float, vocab_size: int | None = None) -> tuple:
    """(plan, the change that would make it fit or None) of a composed recipe for ``world_size``
    ranks of ``capacity_gib`` GiB. ConfigError for a config the trainer would refuse anyway."""
    cfg = validate(composed, world_size=world_size, note=lambda _: None, check_environment=False)
    plan = plan_of(cfg, world_size, vocabulary(cfg, vocab_size), int(capacity_gib * 2**30))
    return plan, None if plan.fits else fitting_change(plan)


def device_capacity(cfg: PretrainConfig) -> tuple[int, str]:
    """(bytes per rank, a sentence with ``{}`` for them) of the device this process trains on: the
    GPU's total memory, or on CPU the host's available memory (/proc/meminfo) over the ranks on
    this host ($LOCAL_WORLD_SIZE)."""
    import torch

    if cfg.train.device == Device.cuda:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index} has {{}}"
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return available // ranks, "this host has {} available" + (f" for each of its {ranks} ranks" if ranks > 1 else "")


def check_fits(cfg: PretrainConfig, world_size: int) -> None:
    """The trainer's refusal, before any process group or model: ConfigError on train.device when
    the plan's peak exceeds the device's memory, with the figures and the change that would fit."""
    capacity, what = device_capacity(cfg)
    plan = plan_of(cfg, world_size, load_tokenizer(cfg.data.tokenizer).vocab_size, capacity)
    if plan.fits:
        return
    s = plan.worst
    change = fitting_change(plan)
    fix = (f"it fits with {' '.join(change[0])}" if change
           else "no single change of recomputation, micro batch, tp or cp fits")
    raise ConfigError("train.device", cfg.train.device,
                      f"a rank needs {_gib(s.peak)} (parameters {_gib(s.param_bytes)}, gradients "
                      f"{_gib(s.grad_bytes)}, optimizer {_gib(s.optimizer_bytes)}, activations "
                      f"{_gib(s.peak - s.static)}) and {what.format(_gib(capacity))}: does not fit; {fix} "
                      "(scripts/pretrain.py --plan shows the figures)")
