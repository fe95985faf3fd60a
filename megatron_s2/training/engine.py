"""One optimizer step over a list of micro batches: the CPU path and the GPU path.

Both take the same model (megatron_s2.build_gpt_model), the same batches (already sliced for this
context-parallel rank) and the same loss: per micro batch the mean over its loss-masked tokens,
divided by the number of micro batches; gradients are averaged over the data-parallel x context-
parallel group. A step is three calls, so that the loop can check for NaN/Inf on every rank before
anything changes the weights: ``forward_backward`` (the global mean loss, token-weighted over
every rank's micro batches; gradients reduced), ``grad_norm`` (before clipping), ``step`` (clip,
update). Skipping a step is simply not calling ``step``: the next ``forward_backward`` clears the
gradients.

- ``CpuEngine`` (fp32, gloo; its tensors stay on the model's device, so a GPU test can run it as a
  reference): plain torch AdamW, a flattened gradient all-reduce, a global norm over
  tensor-parallel shards (duplicated parameters counted once), clipping. Optimizer state goes
  into dist checkpoints through Megatron's helpers, sharded like the parameters it belongs to.
- ``GpuEngine`` (CUDA, bf16 or fp32): Megatron-Core's DistributedDataParallel, distributed
  optimizer and forward-backward schedules (pipeline schedules when pp > 1). The schedules reduce
  gradients only through hooks on the model's TransformerConfig; ``set_schedule_hooks`` sets them
  as Megatron-LM does; parallel.overlap_grad_reduce and parallel.overlap_param_gather overlap the
  gradient reduce-scatter with the backward and the parameter all-gather with the next forward
  (``ddp_config``, ``ParamGatherHooks``). The objective above is Megatron's own normalisation: the
  loss function returns (loss_sum, num_tokens, report), and with ``calculate_per_token_loss=False``
  (the default) the schedules divide by the tokens and by the number of micro batches
  (``schedules.forward_step_calc_loss``) and DDP scales gradients by 1 / (dp x cp) before summing.

A micro batch is [b, s] tensors (tokens, labels, loss_mask, position_ids) or, with
data.reset_attention_mask, one pack of documents ([1, b*s] plus cu_seqlens and max_seqlen, see
``data.pack_documents``), which both engines hand to the model as Megatron's PackedSeqParams.

Under context parallelism (both engines) a micro batch's tokens are this rank's loss-masked
tokens: the objective is the mean of the CP ranks' local token means, which is the micro batch's
token mean when every CP chunk holds as many loss-masked tokens (e.g. no mask). CPU tests check
the hook wiring and the schedule arguments; tests/test_gpu_engine.py (marked gpu) compares
GpuEngine with CpuEngine and two ranks with one process.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                        optim_state_to_sharding_state)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from .config import PretrainConfig, Precision


def _model_forward(model, batch) -> torch.Tensor:
    """The per-token loss [b, s] of one micro batch; a pack (``data.pack_documents``: [1, b*s]
    with ``cu_seqlens`` and ``max_seqlen``) goes in as Megatron's PackedSeqParams (thd)."""
    packed = None
    if "cu_seqlens" in batch:
        cu, longest = batch["cu_seqlens"], batch["max_seqlen"]
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)


def _forward_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum, num_tokens, per-token loss [b, s]) of one micro batch."""
    per_token = _model_forward(model, batch)
    mask = batch["loss_mask"]
    return (per_token.float() * mask).sum(), mask.sum(), per_token


def reduce_loss(loss_sum_tokens: torch.Tensor) -> float:
    """Global mean loss from this rank's [loss_sum, num_tokens] (zeros off the last pp stage)."""
    dist.all_reduce(loss_sum_tokens, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(loss_sum_tokens, group=parallel_state.get_pipeline_model_parallel_group())
    total, tokens = loss_sum_tokens.tolist()
    return total / max(tokens, 1.0)


class CpuEngine:
    """fp32 training with a plain torch optimizer (the trainer's CPU path)."""

    def __init__(self, model: torch.nn.Module, cfg: PretrainConfig) -> None:
        t = cfg.train
        self.model = self.module = model
        self.clip_grad = t.clip_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        # No weight decay on norms and biases (wd_mult is read by Megatron's scheduler).
        decay = [p for p in self.params if p.dim() > 1]
        no_decay = [p for p in self.params if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}],
            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
        self.dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.mp_group = parallel_state.get_model_parallel_group()

    def forward_backward(self, micro_batches: list[dict]) -> float:
        self.model.train()
        for p in self.params:
            p.grad = None
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            loss_sum, tokens, _ = _forward_loss(self.model, batch)
            (loss_sum / tokens.clamp(min=1) / len(micro_batches)).backward()
            totals += torch.stack([loss_sum.detach(), tokens]).double()
        self._all_reduce_grads()
        return reduce_loss(totals)

    @torch.no_grad()
    def grad_norm(self) -> float:
        """Global L2 norm over TP/PP shards (duplicated parameters counted once)."""
        squares = sum((p.grad.double().square().sum() for p in self.params
                       if param_is_not_tensor_parallel_duplicate(p)),
                      torch.zeros((), dtype=torch.float64, device=self.device))
        dist.all_reduce(squares, group=self.mp_group)
        return squares.sqrt().item()

    @torch.no_grad()
    def step(self, grad_norm: float) -> None:
        if self.clip_grad > 0 and grad_norm > self.clip_grad:
            for p in self.params:
                p.grad.mul_(self.clip_grad / (grad_norm + 1e-6))
        self.optimizer.step()

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict]) -> float:
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            loss_sum, tokens, _ = _forward_loss(self.model, batch)
            totals += torch.stack([loss_sum, tokens]).double()
        return reduce_loss(totals)

    def params_gathered(self):
        """The parameters are always the optimizer's (the GPU path may gather them late)."""
        return contextlib.nullcontext()

    def _all_reduce_grads(self) -> None:
        size = dist.get_world_size(self.dp_group)
        if size == 1:
            return
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        flat /= size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- checkpointing -------------------------------------------------------------------------
    def optimizer_sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool) -> dict:
        """AdamW state sharded like the parameters (Megatron's helpers); one shared step."""
        if is_loading:      # a template needs every state tensor to exist
            for p in self.params:
                self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                           "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        state = self.optimizer.state_dict()
        steps = {float(s["step"]) for s in state["state"].values()}
        id_map = get_param_id_to_sharded_param_map(
            model_sharded_state_dict, (p for g in self.optimizer.param_groups for p in g["params"]))
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        state["state"]["common_step"] = steps.pop() if steps else 0.0
        return state

    def load_optimizer_state(self, loaded: dict) -> None:
        step = loaded["state"].pop("common_step")
        state = {i: {**s, "step": torch.tensor(float(step))} for i, s in loaded["state"].items()}
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": self.optimizer.state_dict()["param_groups"]})


def set_schedule_hooks(config, model, optimizer) -> None:
    """Set the hooks of ``config`` (the TransformerConfig that ``model`` and Megatron's schedules
    read) for a Megatron DDP ``model`` and its Megatron ``optimizer``, as Megatron-LM's
    ``training.train`` does:

    - ``finalize_model_grads_func = megatron.core.distributed.finalize_model_grads``: after the last
      backward the schedules call it with ([model], num_tokens or None, pg_collection=...,
      force_all_reduce=...). It finishes the DDP gradient reduction (all-reduce, or reduce-scatter
      into the distributed optimizer's shards) over dp x cp, sums the gradients of parameters
      marked ``sequence_parallel`` over TP, and ties the embedding gradients of the first and last
      pipeline stages. Without it no gradient is reduced at all.
    - ``grad_scale_func = optimizer.scale_loss``: the schedules scale the loss before backward
      (1 in bf16 and fp32; the loss scale under fp16).
    - With ``model.ddp_config.overlap_grad_reduce``: ``no_sync_func = model.no_sync`` (no reduction
      during all but the last micro batch) and ``grad_sync_func = model.start_grad_sync`` (the
      pipeline schedules launch a chunk's reduction after its last backward); with
      ``overlap_param_gather`` and ``align_param_gather``: ``param_sync_func =
      model.start_param_sync``. Otherwise these are None (parallel.overlap_grad_reduce and
      parallel.overlap_param_gather choose; ``ddp_config``).
    """
    from megatron.core.distributed import finalize_model_grads

    ddp = model.ddp_config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync if ddp.overlap_grad_reduce else None
    config.grad_sync_func = model.start_grad_sync if ddp.overlap_grad_reduce else None
    config.param_sync_func = (model.start_param_sync if ddp.overlap_param_gather and ddp.align_param_gather
                              else None)


def ddp_config(cfg: PretrainConfig):
    """Megatron's DistributedDataParallelConfig of the GPU path: fp32 gradient reduction, the
    distributed optimizer, and the overlap knobs as Megatron-LM sets them (align_param_gather, its
    default, with overlap_param_gather); NaN/Inf checks are the loop's."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p = cfg.parallel
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                         overlap_grad_reduce=p.overlap_grad_reduce,
                                         overlap_param_gather=p.overlap_param_gather,
                                         align_param_gather=p.overlap_param_gather,
                                         check_for_nan_in_grad=False)


class ParamGatherHooks:
    """With ``overlap_param_gather``, Megatron's DDP all-gathers the distributed optimizer's updated
    parameters in forward pre-hooks, during the next forward. As Megatron-LM's ``training.train``:
    the hooks (and ``config.param_sync_func``) are off until the first successful optimizer step
    (``after_step``), so that a fault in loading or initialisation does not spread through the
    first all-gather; evaluation and checkpoint saves run ``gathered()``: hooks off, parameters
    all-gathered at once, hooks back on after. Without the overlap every call does nothing."""

    def __init__(self, model, config) -> None:
        self.model, self.config = model, config
        self.enabled = False
        self.param_sync_func = None
        if model.ddp_config.overlap_param_gather:
            model.disable_forward_pre_hook(param_sync=False)
            self.param_sync_func, config.param_sync_func = config.param_sync_func, None

    def after_step(self) -> None:
        if self.model.ddp_config.overlap_param_gather and not self.enabled:
            self.model.enable_forward_pre_hook()
            self.config.param_sync_func = self.param_sync_func
            self.enabled = True

    @contextlib.contextmanager
    def gathered(self):
        if not self.enabled:        # no optimizer step since the parameters were last gathered
            yield
            return
        self.model.disable_forward_pre_hook()          # param_sync=True: waits for the all-gather
        try:
            yield
        finally:
            self.model.enable_forward_pre_hook()


def schedule_shape(cfg: PretrainConfig) -> dict:
    """``seq_length`` and ``micro_batch_size`` for Megatron's forward-backward schedules: the whole
    training sequence, not this rank's part. The schedules size the pipeline send/receive buffers
    themselves as [seq_length / cp (/ tp under sequence parallelism), micro_batch_size, hidden]
    (``schedules.get_tensor_shapes`` in megatron-core 0.16). With data.reset_attention_mask a
    micro batch is one pack of train.seq_length x train.micro_batch_size tokens ([t, 1, hidden]
    between stages): seq_length is that product and micro_batch_size 1."""
    t = cfg.train
    if cfg.data.reset_attention_mask:
        return {"seq_length": t.seq_length * t.micro_batch_size, "micro_batch_size": 1}
    return {"seq_length": t.seq_length, "micro_batch_size": t.micro_batch_size}


class GpuEngine:
    """Megatron-Core DDP + distributed optimizer + forward-backward schedules."""

    def __init__(self, model: torch.nn.Module, cfg: PretrainConfig, transformer_config) -> None:
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t = cfg.train
        self.shape = schedule_shape(cfg)
        self.module = model
        self.model = DistributedDataParallel(config=transformer_config, ddp_config=ddp_config(cfg), module=model)
        bf16 = t.precision == Precision.bf16
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                            clip_grad=t.clip_grad, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32,
                            use_distributed_optimizer=True),
            [self.model])
        set_schedule_hooks(transformer_config, self.model, self.optimizer)
        self.param_gather = ParamGatherHooks(self.model, transformer_config)

    def _run(self, micro_batches: list[dict], forward_only: bool) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            per_token = _model_forward(model, batch)

            def loss_func(output_tensor):
                # (sum, tokens, report): Megatron divides by this rank's tokens and micro batches.
                mask = batch["loss_mask"]
                loss_sum, tokens = (output_tensor.float() * mask).sum(), mask.sum()
                return loss_sum, tokens.int(), {"lm loss": torch.stack([loss_sum.detach(), tokens])}
            return per_token, loss_func

        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.model],
            num_microbatches=len(micro_batches), forward_only=forward_only, **self.shape)
        totals = torch.zeros(2, dtype=torch.float64, device="cuda")
        for report in reports:      # empty off the last pipeline stage
            totals += report["lm loss"].double()
        return reduce_loss(totals)

    # Megatron's optimizer.step() is prepare_grads, clip, step_with_ready_grads (ChainedOptimizer's
    # order); split here so that the loop's NaN/Inf check sits between the norm and the update.
    def forward_backward(self, micro_batches: list[dict]) -> float:
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self._run(micro_batches, forward_only=False)

    def grad_norm(self) -> float:
        found_inf = self.optimizer.prepare_grads()     # copies the reduced grads to the fp32 shards
        return math.inf if found_inf else float(self.optimizer.get_grad_norm())

    def step(self, grad_norm: float) -> None:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            parameters = optimizer.get_parameters()
            if optimizer.config.clip_grad > 0 and parameters:
                clip_grad_by_total_norm_fp32(
                    parameters, max_norm=optimizer.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.optimizer.step_with_ready_grads()
        self.param_gather.after_step()

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict]) -> float:
        self.model.eval()
        with self.param_gather.gathered():
            return self._run(micro_batches, forward_only=True)

    def params_gathered(self):
        """A context in which the module's parameters are the optimizer's latest (checkpoints)."""
        return self.param_gather.gathered()

    def optimizer_sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool) -> dict:
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading)

    def load_optimizer_state(self, loaded: dict) -> None:
        self.optimizer.load_state_dict(loaded)
