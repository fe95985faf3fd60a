"""The pretraining loop: process groups, model, data, resume, steps, validation, checkpoints.

``pretrain(cfg)`` takes a config that ``validate`` returned and runs to ``train.iters``. Data
position, iteration, optimizer, scheduler and RNG come back from the newest complete checkpoint,
so a resumed run continues exactly where the saved one was; a run whose checkpoint already reached
train.iters says so and does nothing.

Before any process group or output exists, ``preflight`` refuses (ConfigError, nothing created):
an output directory that cannot be written, a fresh run (checkpoint.resume=false) over another
run's checkpoints, a resume with another layout, S2 config or model than the checkpoint's, and
one whose schedule or global batch differs from the checkpoint's without saying which to use;
then ``plan.check_fits`` refuses a run whose memory plan exceeds the device's memory.
Until the first step SIGTERM keeps its default action, so a launch stuck before training (data
preparation, a hung collective) ends at once; from the first step on, SIGTERM or SIGUSR1 (torchrun,
Slurm), train.exit_duration_in_mins and train.exit_interval finish the current step, save, and
return (``stopping``). Ctrl-C raises RunInterrupted, which says where the run stopped. Before the
first step every rank checks that it shares run.dir, checkpoint.dir and data.cache_dir with rank 0
and resumes from the same checkpoint (``shared_dirs``). A NaN/Inf loss or gradient norm on any
rank is agreed on by all ranks before the optimizer step and handled by train.on_non_finite.
Collectives time out after parallel.distributed_timeout_minutes, so a dead rank fails the job
instead of hanging it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import random
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megatron_s2 import FlopsPerToken, build_gpt_model, sigterm_deferral, training_flops_per_token
from megatron_s2.accelerators import describe as describe_accelerators
from megatron_s2.context_parallel import cp_exchange_report, split_batch_for_cp
from megatron_s2.parallel import local_ranks, process_group_backend

from . import checkpoint as ckpt
from .config import Device, ModelConfig, NonFinitePolicy, PretrainConfig, Precision, to_plain_dict
from .data import (build_datasets, default_dataset, get_micro_batch, load_tokenizer, micro_batch_start,
                   pack_documents)
from .engine import CpuEngine, GpuEngine
from .errors import ConfigError, RunInterrupted, require
from .init_from import check_init_from, load_init_from
from .metrics import MetricsLogger, say
from .resume import check_resume, complete_message, run_record
from .shared_dirs import agreed_checkpoint, check_shared_dirs
from .stopping import StopConditions


def _check_writable(key: str, path: str) -> None:
    """A directory can be created in the nearest existing directory on the way to ``path``: probed
    with a temporary directory that is removed at once (permission bits do not tell for root, nor
    for /proc or a read-only mount)."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    require(os.path.isdir(existing), key, path, f"{existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".megatron_s2_probe_", dir=existing))
    except OSError as e:
        raise ConfigError(key, path, f"cannot create a directory in {existing} ({e.strerror})") from None


def preflight(cfg: PretrainConfig, world_size: int) -> tuple[str, int] | None:
    """Every refusal that reads the disk, before any process group, model or output exists (every
    rank checks; nothing is created): run.dir and the checkpoint directory can be written; a fresh
    run (checkpoint.resume=false) does not write over another run's checkpoints; a resumed run has
    the checkpoint's layout, S2 config and model, and unless the checkpoint is complete its global
    batch and schedule (``resume.check_resume``, which may replace the schedule in ``cfg``); a fresh
    run from checkpoint.init_from has its model keys and readable weights of the right shapes.
    Returns (path, iteration) of the checkpoint to resume from, or None."""
    _check_writable("run.dir", cfg.run.dir)
    _check_writable("checkpoint.dir" if cfg.checkpoint.dir else "run.dir", cfg.checkpoint_dir)
    existing = ckpt.complete_checkpoints(cfg.checkpoint_dir)
    if not existing:
        if cfg.checkpoint.init_from:
            check_init_from(cfg)
        return None
    iteration, path = existing[-1]
    require(cfg.checkpoint.resume, "checkpoint.resume", False,
            f"{cfg.checkpoint_dir} holds checkpoints (newest {os.path.basename(path)}); use a new run.dir "
            "or checkpoint.dir, or delete them")
    vocab_size = padded_vocab_size(load_tokenizer(cfg.data.tokenizer).vocab_size, cfg)
    meta = ckpt.read_meta(path)
    ckpt.check_compatible(meta, run_meta(cfg, world_size, vocab_size), path,
                          defaults={"model": to_plain_dict(ModelConfig())})
    if iteration < cfg.train.iters:
        check_resume(cfg, meta, path, note=lambda text: say(f"note: {text}"))
    return path, iteration


def init_distributed(cfg: PretrainConfig) -> torch.device:
    """torchrun's environment, or a single-process group with an in-memory store (no port). On
    CUDA, local rank r uses GPU r modulo the GPUs there are; NCCL, or gloo when ranks must share a
    GPU (``process_group_backend``)."""
    cuda = cfg.train.device == Device.cuda
    gpus = torch.cuda.device_count() if cuda else 0
    backend = process_group_backend(cuda, local_ranks(), gpus)
    if cuda and backend == "gloo":
        say(f"{local_ranks()} ranks on {gpus} GPU(s): gloo instead of NCCL, which cannot put two ranks on one GPU")
    timeout = datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % gpus)   # validate: gpus >= 1
        torch.cuda.set_device(device)
    p = cfg.parallel
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=p.tp,
                                             pipeline_model_parallel_size=p.pp,
                                             context_parallel_size=p.cp)
    return device


def seed_everything(seed: int, cuda: bool) -> None:
    """The same seed on every rank. On the CPU path weights are built whole and sliced
    (use_cpu_initialization), so any TP size starts from one model; on CUDA, Megatron's RNG tracker
    draws each TP shard from its own seed (as Megatron-LM does), so different TP sizes start from
    different (equally distributed) weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(cfg: PretrainConfig) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    bf16 = t.precision == Precision.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm", gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu, add_bias_linear=False, add_qkv_bias=m.add_qkv_bias,
        layernorm_epsilon=m.layernorm_epsilon,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp, context_parallel_size=p.cp,
        pipeline_model_parallel_size=p.pp, sequence_parallel=p.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        use_cpu_initialization=t.device == Device.cpu,
        cuda_graph_scope=[],    # the whole layer; Megatron's default, "full", warns that it is deprecated
        **recompute_knobs(cfg))


def recompute_knobs(cfg: PretrainConfig) -> dict:
    """model.recompute_* as TransformerConfig fields (recompute_modules None: Megatron's default)."""
    m = cfg.model
    knobs = {"recompute_granularity": m.recompute_granularity and m.recompute_granularity.value,
             "recompute_method": m.recompute_method and m.recompute_method.value,
             "recompute_num_layers": m.recompute_num_layers}
    if m.recompute_modules is not None:
        knobs["recompute_modules"] = list(m.recompute_modules)
    return knobs


def build_model(cfg: PretrainConfig, config: TransformerConfig, vocab_size: int, pre_process: bool = True,
                post_process: bool = True, recompute_impl: str = "megatron"):
    """This rank's GPTModel of a validated config (inside Megatron's model-parallel state), built on
    ``config`` (``transformer_config(cfg)``: the object whose hooks Megatron's schedules read; see
    build_gpt_model for ``recompute_impl``)."""
    m = cfg.model
    return build_gpt_model(config, cfg.attention.s2, cfg.attention.layout, vocab_size=vocab_size,
                           max_sequence_length=cfg.train.seq_length, rotary_base=m.rotary_base,
                           rope_scaling=m.rope_scaling, rope_scaling_factor=m.rope_scaling_factor,
                           pre_process=pre_process, post_process=post_process,
                           share_embeddings_and_output_weights=m.share_embeddings_and_output_weights,
                           recompute_impl=recompute_impl)


def padded_vocab_size(vocab_size: int, cfg: PretrainConfig) -> int:
    """The model's vocabulary: model.vocab_size when set, else the tokenizer's ``vocab_size`` padded
    to a multiple of model.make_vocab_size_divisible_by x parallel.tp."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tp
    return -(-vocab_size // multiple) * multiple


def run_meta(cfg: PretrainConfig, world_size: int, vocab_size: int) -> dict:
    """What a checkpoint records about the run (resume refuses a different layout/S2/model).
    The model is recorded by its padded vocabulary, not the padding rule, which depends on tp."""
    model = to_plain_dict(cfg.model)
    del model["make_vocab_size_divisible_by"], model["vocab_size"]
    return {"layout": cfg.attention.layout, "s2": dataclasses.asdict(cfg.attention.s2),
            "model": {**model, "padded_vocab_size": vocab_size},
            "parallel": {"tp": cfg.parallel.tp, "cp": cfg.parallel.cp, "pp": cfg.parallel.pp},
            "world_size": world_size, **run_record(cfg)}


def pretrain(cfg: PretrainConfig) -> dict:
    """Train; returns {"iteration", "loss" (the mean of the last log window, as logged),
    "val_loss", "checkpoint", "stopped" (why the run stopped before train.iters, see
    ``stopping.StopConditions``, or None), "skipped_steps"} (skipped in this launch; "complete":
    True when the checkpoint had already reached train.iters and nothing was done).

    Raises ConfigError (refused before anything is created: ``preflight``; or on every rank before
    the first step, with the markers removed: ``shared_dirs``) and RunInterrupted
    (Ctrl-C, saying where the run stopped). Until the first step SIGTERM keeps its default action
    (the process ends at once: nothing to save yet, even inside a hung dataset build)."""
    launched = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resume = preflight(cfg, world_size)
    if resume is None or resume[1] < cfg.train.iters:
        from .plan import check_fits    # the plan builds on this module's transformer_config

        check_fits(cfg, world_size)     # one line, before any model is built, if it cannot fit the device
    sigterm_deferral.release()      # the config is accepted (scripts/pretrain.py deferred SIGTERM)
    device = init_distributed(cfg)
    try:
        try:
            path = agreed_checkpoint(cfg)           # every rank resumes at one iteration (several nodes)
            check_shared_dirs(cfg)
        except ConfigError:
            sigterm_deferral.defer()            # every rank refuses: each exits 2, none -15 by torchrun
            raise
        if path is not None and resume[1] >= cfg.train.iters:
            say(complete_message(cfg, ckpt.read_meta(path), path))
            return {"iteration": resume[1], "loss": None, "val_loss": None, "checkpoint": path,
                    "stopped": None, "skipped_steps": 0, "complete": True}
        p = cfg.parallel
        say(f"{cfg.run.name}: {'resuming from ' + os.path.basename(path) if path else 'starting'} in "
            f"{cfg.run.dir} | world {world_size} = dp {world_size // (p.tp * p.cp * p.pp)} x tp {p.tp} x cp "
            f"{p.cp} x pp {p.pp} | preparing data and model ...")
        say(describe_accelerators(cfg.train.device == Device.cuda))
        return _train(cfg, device, launched, path)
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise RunInterrupted("interrupted before the first step (nothing saved by this launch); rerun "
                             "the same command to " + ("resume from " + resume[0] if resume else "start")) from None
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _train(cfg: PretrainConfig, device: torch.device, launched: float, path: str | None) -> dict:
    """The run from ``path`` (the agreed checkpoint, None for a fresh start) to train.iters or a stop."""
    t = cfg.train
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    seed_everything(t.seed, device.type == "cuda")

    # Data (the embedded default is prepared once, by rank 0).
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    prefixes = list(cfg.data.prefixes)
    if not prefixes:
        if rank == 0:
            default_dataset(cfg.data.cache_dir, tokenizer, cfg.data.default_documents.value)
        dist.barrier()
        prefixes = [default_dataset(cfg.data.cache_dir, tokenizer, cfg.data.default_documents.value)]
    # Every evaluation reads the same first eval_iters global batches of the validation split.
    train_ds, valid_ds = build_datasets(
        prefixes, cfg.data.weights, list(cfg.data.valid_prefixes), cfg.data.split, tokenizer,
        seq_length=t.seq_length, seed=t.seed, num_train_samples=t.iters * t.global_batch_size,
        num_valid_samples=t.eval_iters * t.global_batch_size if t.eval_interval else 0,
        cache_dir=cfg.data.cache_dir, eod_mask_loss=cfg.data.eod_mask_loss)

    # Model, optimizer, schedule.
    config = transformer_config(cfg)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, cfg)
    pp_rank, pp_size = (parallel_state.get_pipeline_model_parallel_rank(),
                        parallel_state.get_pipeline_model_parallel_world_size())
    model = build_model(cfg, config, vocab_size, pre_process=pp_rank == 0, post_process=pp_rank == pp_size - 1,
                        recompute_impl="torch" if device.type == "cpu" else "megatron")
    if cfg.checkpoint.init_from and path is None:
        load_init_from(model, cfg)     # before the engine: the optimizer copies the weights it starts from
    model.to(device)
    engine = CpuEngine(model, cfg) if device.type == "cpu" else GpuEngine(model, cfg, config)
    # preflight() settled the schedule against the checkpoint's (resume.check_resume).
    scheduler = OptimizerParamScheduler(
        engine.optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_iters,
        lr_decay_steps=t.lr_decay_iters, lr_decay_style=t.lr_decay_style.value,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.iters, wd_incr_style="constant",
        override_opt_param_scheduler=t.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not t.override_opt_param_scheduler)
    flops = training_flops_per_token(config, cfg.attention.layout, cfg.attention.s2, t.seq_length, vocab_size)

    # Resume.
    meta = run_meta(cfg, world_size, vocab_size)
    iteration = consumed = 0
    if path is not None:       # preflight() checked that it matches this model
        saved = ckpt.read_meta(path)
        state = _load(path, engine, scheduler, same_world=saved["world_size"] == world_size)
        iteration, consumed = state["progress"]["iteration"], state["progress"]["consumed_samples"]

    log = MetricsLogger(cfg, enabled=rank == 0, flops=flops, world_size=world_size,
                        start_iteration=iteration)
    packed = cfg.data.reset_attention_mask
    log.message(f"{'resumed from ' + path if path else 'starting'} at iteration {iteration} | layout "
                f"{cfg.attention.layout} | global batch {t.global_batch_size} = micro {t.micro_batch_size} x "
                f"dp {dp_size} x accumulation {accumulation} | {flops.sparse / 1e9:.3f} GFLOP/token "
                f"(dense-equivalent {flops.dense_equivalent / 1e9:.3f})"
                + (" unpacked; TFLOP/s count each step's packed documents" if packed else ""))
    if cfg.parallel.cp > 1:
        log.message(cp_exchange_report(config, cfg.attention.s2, cfg.attention.layout, t.seq_length,
                                       t.micro_batch_size, parallel_state.get_context_parallel_rank(),
                                       head_offset=parallel_state.get_tensor_model_parallel_rank()
                                       * config.num_attention_heads // cfg.parallel.tp))

    def global_batch(dataset, first_sample) -> tuple[list[dict], list[list[int]]]:
        """This rank's micro batches of a global batch, on the device, and (packed) the document
        lengths of each of their samples (packed on the host, before the copy)."""
        batches, documents = [], []
        for step in range(accumulation):
            start = micro_batch_start(first_sample, step, dp_rank, dp_size, t.micro_batch_size)
            batch = get_micro_batch(dataset, start, t.micro_batch_size, cfg.data.loss_token_ids)
            if packed:
                batch, lengths = pack_documents(batch, tokenizer.eod)
                documents += lengths
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            batches.append(split_batch_for_cp(batch, cfg.parallel.cp, parallel_state.get_context_parallel_rank()))
        return batches, documents

    def step_flops(documents: list[list[int]]) -> FlopsPerToken:
        """Training FLOPs per token of this step's global batch: the run's figure, or when packed
        the mean over every sample of the global batch of its own figure (its documents'
        blocks only), summed over the data-parallel ranks (a collective)."""
        if not packed:
            return flops
        per_sample = [training_flops_per_token(config, cfg.attention.layout, cfg.attention.s2, t.seq_length,
                                               vocab_size, document_lengths=lengths) for lengths in documents]
        total = torch.tensor([sum(f.sparse for f in per_sample), sum(f.dense_equivalent for f in per_sample)],
                             dtype=torch.float64, device=device)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        sparse, dense = (total / t.global_batch_size).tolist()
        return FlopsPerToken(sparse=sparse, dense_equivalent=dense)

    def evaluate() -> float:
        losses = [engine.eval_step(global_batch(valid_ds, k * t.global_batch_size)[0]) for k in range(t.eval_iters)]
        return sum(losses) / len(losses)

    def save() -> str:
        with engine.params_gathered():      # overlap_param_gather: parameters gathered before they are read
            model_sd = engine.module.sharded_state_dict()
            state = _state(engine, scheduler, model_sd, iteration, consumed, world_size, rank, is_loading=False)
            return ckpt.save_checkpoint(cfg.checkpoint_dir, iteration, state, meta, cfg.checkpoint.keep_last)

    loss = val_loss = None
    saved_at = iteration if path else None
    stopped = None
    skipped = skipped_in_a_row = 0
    first_iteration, started = iteration, time.time()
    stop = StopConditions(cfg, launched)
    try:
        while iteration < t.iters:
            start = time.time()
            lr = engine.optimizer.param_groups[0]["lr"]
            batches, documents = global_batch(train_ds, consumed)
            this_step_flops = step_flops(documents)
            loss = engine.forward_backward(batches)
            if cfg.debug.step_sleep_seconds:
                time.sleep(cfg.debug.step_sleep_seconds)
            if iteration + 1 in cfg.debug.inject_nan_at_iters and rank == 0:
                _inject_nan_grad(engine.module, cfg.debug.inject_nan_param)
            grad_norm = engine.grad_norm()
            finite = _finite_on_every_rank(loss, grad_norm, device)
            if finite:
                engine.step(grad_norm)
                skipped_in_a_row = 0
            else:
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                report = _non_finite_report(cfg, engine.module, iteration + 1, loss, grad_norm,
                                            skipped_in_a_row)
                if t.on_non_finite == NonFinitePolicy.stop or skipped_in_a_row >= t.max_consecutive_skips:
                    raise FloatingPointError(
                        f"non-finite loss ({loss}) or grad norm ({grad_norm}) at iteration {iteration + 1}"
                        f" (train.on_non_finite={t.on_non_finite.value}, {skipped_in_a_row} in a row); "
                        f"stopped before the optimizer step; diagnostics in {report}")
                log.skipped(iteration + 1, skipped, skipped_in_a_row, report)
            scheduler.step(1)
            iteration += 1
            consumed += t.global_batch_size
            if finite:
                log.step(iteration, loss, lr, grad_norm, time.time() - start, this_step_flops)
            if valid_ds is not None and (iteration % t.eval_interval == 0 or iteration == t.iters):
                val_loss = evaluate()
                log.validation(iteration, val_loss)
            stopped = stop.after_step(iteration, device) if iteration < t.iters else None
            if stopped or (cfg.checkpoint.interval and iteration % cfg.checkpoint.interval == 0):
                saved_at, last_path = iteration, save()
                log.message(f"saved {last_path}")
            if stopped:
                log.message(f"{stopped}: stopped after iteration {iteration}")
                break
        if saved_at != iteration:
            last_path = save()
            log.message(f"saved {last_path}")
    except KeyboardInterrupt:
        newest = ckpt.latest_checkpoint(cfg.checkpoint_dir)
        raise RunInterrupted(f"interrupted during iteration {iteration + 1} of {t.iters}; rerun the same "
                             "command to resume from " + (newest or "the start (no checkpoint yet)")) from None
    finally:
        stop.restore()
        log.finish()
    log.summary(steps=iteration - first_iteration, seconds=time.time() - started, val_loss=val_loss,
                checkpoint=ckpt.latest_checkpoint(cfg.checkpoint_dir), stopped=stopped)
    return {"iteration": iteration, "loss": log.logged_loss, "val_loss": val_loss,
            "checkpoint": ckpt.iter_dir(cfg.checkpoint_dir, iteration), "stopped": stopped,
            "skipped_steps": skipped}


# -- NaN/Inf -------------------------------------------------------------------------------------

def _finite_on_every_rank(loss: float, grad_norm: float, device: torch.device) -> bool:
    """One verdict for all ranks: a rank whose own loss and norm are finite (e.g. a data-parallel
    peer of the rank with the bad gradient, before any reduction carries it over) still skips."""
    ok = torch.tensor([1.0 if math.isfinite(loss) and math.isfinite(grad_norm) else 0.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The reduced gradient: Megatron DDP keeps it in main_grad, the cpu path in grad."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def _inject_nan_grad(module: torch.nn.Module, name: str) -> None:
    """debug.inject_nan_at_iters: a NaN in one element of one parameter's gradient."""
    params = dict(module.named_parameters())
    if name not in params:
        raise ValueError(f"debug.inject_nan_param ({name!r}) is not a parameter of this rank's model; "
                         f"some that are: {sorted(params)[:6]}")
    _grad(params[name]).view(-1)[0] = float("nan")


def _non_finite_report(cfg: PretrainConfig, module: torch.nn.Module, iteration: int, loss: float,
                       grad_norm: float, in_a_row: int) -> str:
    """Gather every rank's parameters with non-finite gradients (collective); rank 0 writes
    <run.dir>/non_finite_iter_<N>.json. Returns its path. Names are this rank's local parameter
    names (under pp a stage numbers its layers from 0)."""
    local = [name for name, p in module.named_parameters()
             if _grad(p) is not None and not torch.isfinite(_grad(p)).all()]
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"loss": loss, "grad_norm": grad_norm, "params": local})
    path = os.path.join(cfg.run.dir, f"non_finite_iter_{iteration:07d}.json")
    if dist.get_rank() == 0:
        report = {"iteration": iteration, "policy": cfg.train.on_non_finite.value,
                  "skipped_in_a_row": in_a_row, "loss": loss, "grad_norm": grad_norm,
                  "non_finite_grads": {f"rank {r}": entry["params"] for r, entry in enumerate(per_rank)
                                       if entry["params"]},
                  "per_rank": {f"rank {r}": {"loss": e["loss"], "grad_norm": e["grad_norm"]}
                               for r, e in enumerate(per_rank)}}
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    return path


def _state(engine, scheduler, model_sd: dict, iteration: int, consumed: int, world_size: int,
           rank: int, is_loading: bool, with_rng: bool = True) -> dict:
    """The checkpoint's sharded state dict (a template to fill when ``is_loading``)."""
    state = {"model": model_sd,
             "optimizer": engine.optimizer_sharded_state_dict(model_sd, is_loading=is_loading),
             "scheduler": scheduler.state_dict(),
             "progress": {"iteration": iteration, "consumed_samples": consumed}}
    if with_rng:
        state["rng"] = ckpt.rng_sharded_object(world_size, rank, None if is_loading else ckpt.get_rng_state())
    return state


def _load(path: str, engine, scheduler, same_world: bool) -> dict:
    """Load model, optimizer, scheduler and (same world size only) this rank's RNG state."""
    model_sd = engine.module.sharded_state_dict()
    template = _state(engine, scheduler, model_sd, 0, 0, dist.get_world_size(), dist.get_rank(),
                      is_loading=True, with_rng=same_world)
    state = ckpt.load_checkpoint(path, template)
    engine.module.load_state_dict(state["model"])
    engine.load_optimizer_state(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_world:
        ckpt.set_rng_state(state["rng"])
    return state
