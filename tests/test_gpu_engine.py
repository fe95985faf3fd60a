"""GpuEngine, the trainer's Megatron path.

On CPU (Megatron's DDP and schedules need CUDA): the hooks that Megatron's forward-backward
schedules call are set as Megatron-LM's training loop sets them, the schedule's pipeline buffers
come out the size of this rank's hidden states, the trainer chooses gloo where ranks must share a
GPU, and the collectives probe checks its results.

On a GPU (marked gpu; tests/multiproc/gpu_engine_worker.py runs the engines): GpuEngine in fp32
against CpuEngine in one process; dp=2, cp=2 and tp=2 with sequence parallelism on two ranks
(gloo on a one-GPU machine) against one process, each skipped only if a bare process group shows
that the backend refuses a collective it needs on CUDA tensors; and the tiny recipe through
``pretrain`` in bf16 with deterministic algorithms, 30 steps, resumed to 40, bit-identical to 40
steps straight. Every launch has a timeout shorter than the GPU check's per-test limit.
"""
import inspect
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel.schedules import get_tensor_shapes
from megatron.core.transformer.transformer_config import TransformerConfig

from torchrun import launch, torchrun_command

from megatron_s2.context_parallel import split_batch_for_cp
from megatron_s2.parallel import process_group_backend
from megatron_s2.training import loop, validate
from megatron_s2.training.config import Device, PretrainConfig, compose_config
from megatron_s2.training.engine import ParamGatherHooks, ddp_config, schedule_shape, set_schedule_hooks
from megatron_s2.training.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiproc" / "gpu_engine_worker.py"
PROBE = REPO / "tests" / "multiproc" / "collectives_probe.py"
DETERMINISTIC_PRETRAIN = REPO / "tests" / "multiproc" / "deterministic_pretrain.py"


class _FakeDDP:
    """What set_schedule_hooks reads of a Megatron DDP model (which needs CUDA to build)."""

    def __init__(self, ddp_config):
        self.ddp_config = ddp_config

    def no_sync(self):
        pass

    def start_grad_sync(self):
        pass

    def start_param_sync(self):
        pass


def _config(**kw):
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, **kw)


def test_schedule_hooks_without_overlap():
    config, model = _config(), _FakeDDP(DistributedDataParallelConfig(use_distributed_optimizer=True))
    optimizer = SimpleNamespace(scale_loss=lambda loss: loss)
    set_schedule_hooks(config, model, optimizer)
    assert config.finalize_model_grads_func is finalize_model_grads
    assert config.grad_scale_func is optimizer.scale_loss
    assert config.no_sync_func is None and config.grad_sync_func is None and config.param_sync_func is None
    # The schedules call it as ([model], num_tokens or None, pg_collection=..., force_all_reduce=...).
    inspect.signature(finalize_model_grads).bind([model], None, pg_collection=None, force_all_reduce=False)


@pytest.mark.parametrize("align_param_gather", [True, False])
def test_schedule_hooks_with_overlap(align_param_gather):
    """Megatron-LM sets param_sync_func only when the parameter all-gathers are aligned across
    pipeline stages (align_param_gather); otherwise each bucket launches its own gather."""
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                        overlap_param_gather=True, align_param_gather=align_param_gather)
    config, model = _config(), _FakeDDP(ddp)
    set_schedule_hooks(config, model, SimpleNamespace(scale_loss=None))
    assert config.no_sync_func == model.no_sync
    assert config.grad_sync_func == model.start_grad_sync
    assert config.param_sync_func == (model.start_param_sync if align_param_gather else None)


OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]


def test_overlap_keys_set_ddp_and_the_schedule_hooks_as_megatron_lm(monkeypatch):
    """The recipe keys reach Megatron's DDP config (align_param_gather on, Megatron-LM's default),
    and with them set_schedule_hooks sets no_sync_func, grad_sync_func and param_sync_func."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # validates train.device=cuda here
    cfg = validate(compose_config(["train.device=cuda", *OVERLAP]), world_size=1)
    ddp = ddp_config(cfg)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.align_param_gather,
            ddp.use_distributed_optimizer, ddp.grad_reduce_in_fp32) == (True, True, True, True, True)
    config, model = _config(), _FakeDDP(ddp)
    set_schedule_hooks(config, model, SimpleNamespace(scale_loss=None))
    assert (config.no_sync_func, config.grad_sync_func, config.param_sync_func) == (
        model.no_sync, model.start_grad_sync, model.start_param_sync)
    plain = ddp_config(validate(compose_config(["train.device=cuda"]), world_size=1))
    assert not (plain.overlap_grad_reduce or plain.overlap_param_gather or plain.align_param_gather)


class _HookedDDP(_FakeDDP):
    """Records the forward pre-hook calls Megatron's DDP would get."""

    def __init__(self, ddp_config):
        super().__init__(ddp_config)
        self.calls = []

    def enable_forward_pre_hook(self):
        self.calls.append("enable")

    def disable_forward_pre_hook(self, param_sync=True):
        self.calls.append(f"disable(param_sync={param_sync})")


def test_param_gather_hooks_follow_megatron_lm():
    """As Megatron-LM's train(): hooks and param_sync_func off until the first optimizer step, then
    on; evaluation and saves gather the parameters (hooks off with a forced sync, then on again);
    before the first step there is nothing to gather."""
    model = _HookedDDP(DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                                     overlap_param_gather=True, align_param_gather=True))
    config = _config()
    set_schedule_hooks(config, model, SimpleNamespace(scale_loss=None))
    hooks = ParamGatherHooks(model, config)
    assert model.calls == ["disable(param_sync=False)"] and config.param_sync_func is None
    with hooks.gathered():
        assert model.calls == ["disable(param_sync=False)"]
    hooks.after_step()
    hooks.after_step()
    assert model.calls == ["disable(param_sync=False)", "enable"] and config.param_sync_func == model.start_param_sync
    with hooks.gathered():
        assert model.calls[-1] == "disable(param_sync=True)"
    assert model.calls[-1] == "enable"

    plain = _HookedDDP(DistributedDataParallelConfig(use_distributed_optimizer=True))
    hooks = ParamGatherHooks(plain, _config())
    hooks.after_step()
    with hooks.gathered():
        pass
    assert plain.calls == []


@pytest.mark.parametrize("overrides, line", [
    (["parallel.overlap_grad_reduce=true"], "parallel.overlap_grad_reduce=true: needs the cuda path (Megatron's "
     "DistributedDataParallel); the cpu path reduces gradients after the backward"),
    (["train.device=cuda", "parallel.overlap_param_gather=true"],
     "parallel.overlap_param_gather=true: needs parallel.overlap_grad_reduce=true too (as in Megatron-LM)"),
])
def test_overlap_refused_in_one_line(overrides, line, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: "train.device=cuda" in overrides)
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides), world_size=1)
    assert str(info.value) == line


@pytest.mark.parametrize("tp,cp,sequence_parallel", [(1, 1, False), (1, 2, False), (2, 4, False), (2, 2, True)])
def test_pipeline_buffers_are_the_size_of_a_ranks_hidden_states(tp, cp, sequence_parallel):
    """Megatron's pipeline schedules size their send/receive buffers from the arguments the engine
    passes; they must equal the hidden states [s, b, h] of this rank's share of a micro batch."""
    cfg = PretrainConfig()
    cfg.train.seq_length, cfg.train.micro_batch_size = 512, 2
    cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.sequence_parallel = tp, cp, sequence_parallel
    config = _config(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    tokens = torch.zeros(cfg.train.micro_batch_size, cfg.train.seq_length)
    local_tokens = split_batch_for_cp({"tokens": tokens}, cp, cp_rank=0)["tokens"]
    local_seq = local_tokens.shape[1] // (tp if sequence_parallel else 1)   # SP splits over TP too
    shapes = get_tensor_shapes(**schedule_shape(cfg), decoder_seq_length=None, config=config,
                               tp_group=SimpleNamespace(size=lambda: tp),
                               cp_group=SimpleNamespace(size=lambda: cp))
    assert shapes == [(local_seq, cfg.train.micro_batch_size, config.hidden_size)]


# -- process groups: the backend choice, and the collectives the engines need from it ----------------

@pytest.mark.parametrize("cuda,local_ranks,gpus,backend", [(False, 2, 0, "gloo"), (True, 1, 1, "nccl"),
                                                           (True, 8, 8, "nccl"), (True, 2, 1, "gloo"),
                                                           (True, 8, 4, "gloo")])
def test_process_group_backend(cuda, local_ranks, gpus, backend):
    """NCCL only where each local rank has a GPU of its own: it refuses two ranks on one device."""
    assert process_group_backend(cuda, local_ranks, gpus) == backend


def test_trainer_puts_two_ranks_on_one_gpu_with_gloo(monkeypatch):
    """init_distributed under torchrun with 2 local ranks and 1 GPU: gloo, and rank 1 on GPU 0."""
    chosen = {}

    class Stop(Exception):
        pass

    def init_process_group(backend, **kwargs):
        chosen["backend"] = backend
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(loop.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(loop.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(loop.torch.cuda, "set_device", lambda device: chosen.setdefault("device", device))
    monkeypatch.setattr(loop.parallel_state, "initialize_model_parallel", lambda **kwargs: (_ for _ in ()).throw(Stop))
    cfg = PretrainConfig()
    cfg.train.device = Device.cuda
    with pytest.raises(Stop):
        loop.init_distributed(cfg)
    assert chosen == {"backend": "gloo", "device": torch.device("cuda", 0)}


def _probe(out: Path, backend: str, device: str) -> dict:
    """tests/multiproc/collectives_probe.py on two ranks: {collective: "ok" | the backend's error}."""
    proc = launch(torchrun_command(PROBE, 2, out, backend, device), SUBPROCESS_TIMEOUT_S, _env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())["collectives"]


def test_collectives_probe_on_cpu_tensors(tmp_path):
    """The probe itself, on a backend that runs every collective: each passes its value check."""
    assert _probe(tmp_path / "probe.json", "gloo", "cpu") == dict.fromkeys(COLLECTIVES, "ok")


# -- on a GPU ------------------------------------------------------------------------------------

SUBPROCESS_TIMEOUT_S = 120
"""Each launch inside a test; scripts/gpu_check.sh gives a test 150 s and the pytest step 200 s."""
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter_tensor (coalesced)",
               "all_gather_into_tensor (coalesced)", "all_to_all_single")
"""What tests/multiproc/collectives_probe.py runs (its docstring says which code calls each)."""
DP = ("all_reduce", "reduce_scatter_tensor (coalesced)", "all_gather_into_tensor (coalesced)")
PARALLEL = {"dp2": ("-", DP), "cp2": ("parallel.cp=2", COLLECTIVES),
            "tp2_sp": ("parallel.tp=2,parallel.sequence_parallel=true",
                       ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor",
                        "reduce_scatter_tensor (coalesced)", "all_gather_into_tensor (coalesced)")),
            "dp2_overlap": (",".join(OVERLAP), DP)}
"""Each two-rank case: its config overrides and the collectives its engine calls on CUDA tensors."""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _worker(out: Path, engines: str, parallel: str, precision: str, masked: bool, nproc: int = 1) -> dict:
    """The worker's JSON; fails the test with the output's end if it did not finish."""
    args = (out, engines, parallel, precision, "1" if masked else "0")
    command = torchrun_command(WORKER, nproc, *args) if nproc > 1 else [sys.executable, str(WORKER), *map(str, args)]
    proc = launch(command, SUBPROCESS_TIMEOUT_S, _env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())


def _close(got: dict, want: dict, rel: float) -> None:
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=rel), (key, got[key], want[key])


@pytest.mark.gpu
def test_gpu_engine_fp32_equals_cpu_engine(tmp_path):
    """Same model, weights and masked batches, one process: Megatron's DDP, distributed optimizer,
    schedules and loss normalisation give CpuEngine's losses and gradient norms."""
    result = _worker(tmp_path / "out.json", "cpu,gpu", "-", "fp32", True)
    _close(result["gpu"], result["cpu"], rel=1e-4)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _worker(tmp_path_factory.mktemp("one") / "out.json", "gpu", "-", "fp32", False)["gpu"]


@pytest.fixture(scope="module")
def two_rank_collectives(tmp_path_factory):
    """What the backend the trainer chooses for two ranks here (gloo on one GPU) runs on CUDA tensors."""
    backend = process_group_backend(True, 2, torch.cuda.device_count())
    return backend, _probe(tmp_path_factory.mktemp("probe") / "probe.json", backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(PARALLEL))
def test_two_ranks_on_one_gpu_equal_one_process(tmp_path, one_process, two_rank_collectives, case):
    """dp=2, cp=2, or tp=2 with sequence parallelism on two ranks (sharing the GPU on a one-GPU
    machine, over gloo): gradients are reduced over dp x cp and the norm weights' over TP, so losses
    and gradient norms equal the single process's (fp32; other GEMM shapes and summation orders
    allow 1e-3). dp2_overlap: the same with the reduce-scatter overlapped with the backward and the
    parameter all-gather with the next forward. Skipped only where the bare process-group probe
    shows that the backend refuses a collective this case needs; otherwise every failure is the
    test's."""
    overrides, needs = PARALLEL[case]
    backend, collectives = two_rank_collectives
    refused = {name: collectives[name] for name in needs if collectives[name] != "ok"}
    if refused:
        pytest.skip(f"{backend} on CUDA tensors cannot run what {case} needs: {refused}")
    result = _worker(tmp_path / "out.json", "gpu", overrides, "fp32", False, nproc=2)
    assert result["backend"] == backend
    _close(result["gpu"], one_process, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [[], OVERLAP], ids=["plain", "overlap"])
def test_gpu_training_resumes_on_the_straight_runs_losses(tmp_path, overlap):
    """The tiny recipe on CUDA in bf16 (Megatron DDP, distributed optimizer), with torch's
    deterministic algorithms and a fixed cuBLAS workspace (tests/multiproc/deterministic_pretrain.py,
    which refuses an op without a deterministic implementation): 30 steps, saved, then resumed to
    40, against 40 steps straight. The first 30 steps of the two runs are the same work, so they
    are bit-identical, and then so are steps 31-40. With the overlap knobs the checkpoint must hold
    the parameters of step 30 all-gathered (saves run inside ParamGatherHooks.gathered), or the
    resumed run starts from stale weights."""
    def run(run_dir, iters):
        overrides = ["train.device=cuda", "train.precision=bf16", f"train.iters={iters}",
                     "train.lr_decay_iters=40", "train.eval_interval=0", "logging.interval=1",
                     "logging.wandb.mode=disabled", f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                     *overlap]
        proc = launch([sys.executable, str(DETERMINISTIC_PRETRAIN), *overrides], SUBPROCESS_TIMEOUT_S, _env())
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        with open(run_dir / "metrics.jsonl") as f:
            return {r["iteration"]: r["loss"] for r in map(json.loads, f) if "loss" in r}

    straight = run(tmp_path / "straight", 40)
    run(tmp_path / "resumed", 30)
    resumed = run(tmp_path / "resumed", 40)
    assert sorted(resumed) == sorted(straight) == list(range(1, 41))
    first = {i: (resumed[i], straight[i]) for i in range(1, 31) if resumed[i] != straight[i]}
    assert not first, f"not deterministic: two runs of the same 30 steps differ at {first}"
    after = {i: (resumed[i], straight[i]) for i in range(31, 41) if resumed[i] != straight[i]}
    assert not after, f"the resumed run left the straight run's losses: {after}"
    assert straight[40] < straight[1] - 0.5, straight          # it learns
