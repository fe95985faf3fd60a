"""The pretraining loop on CPU: the default command end to end, exact resume, a kill during a
save, SIGTERM, resume refusals, and tensor/data parallel runs (torchrun, gloo) against the
single-process run."""
import json
import os
import signal
import subprocess
import sys

import pytest

from megatron_s2.training import pretrain, validate
from megatron_s2.training.checkpoint import complete_checkpoints, latest_checkpoint
from megatron_s2.training.config import compose_config
from megatron_s2.training.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "scripts", "pretrain.py")
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "attention.layout=SD",
        "attention.s2.block_size=16", "attention.s2.local_blocks=2", "attention.s2.vert_stride=2",
        "train.seq_length=128", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.warmup_iters=1", "train.eval_interval=0", "logging.interval=1",
        "logging.wandb.mode=disabled"]
RECORD_KEYS = {"iteration", "loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_device", "mfu",
               "step_time", "memory_gib"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("s2cache"))


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)        # no netrc, no wandb settings: auto mode must go offline
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(run_dir, cache_dir, *overrides) -> dict:
    cfg = validate(compose_config(TINY + [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides]),
                   world_size=1)
    return pretrain(cfg)


def _records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(run_dir) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def test_default_command_end_to_end(tmp_path, cache_dir):
    """`python scripts/pretrain.py` (the tiny recipe, shortened): loss falls, metrics.jsonl has every
    log step, validation runs, wandb writes offline files, checkpoints land under run.dir."""
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("logging", "train.eval_interval"))]
    result = subprocess.run(
        [sys.executable, PRETRAIN, *overrides, "train.iters=40", "train.warmup_iters=4",
         "train.eval_interval=20", "logging.interval=5", "checkpoint.interval=20",
         f"run.dir={run_dir}", f"data.cache_dir={cache_dir}"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter 40/40 | loss" in result.stdout and "TFLOP/s/dev" in result.stdout
    records = _records(run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in steps] == list(range(5, 41, 5))
    assert all(RECORD_KEYS <= r.keys() for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, [r["loss"] for r in steps]
    assert [r["iteration"] for r in records if "val_loss" in r] == [20, 40]
    assert os.path.isfile(run_dir / "config.yaml") and os.path.isfile(run_dir / "attention_pattern.png")
    offline = [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-")]
    assert offline and any(f.endswith(".wandb") for f in os.listdir(run_dir / "wandb" / offline[0]))
    assert [i for i, _ in complete_checkpoints(str(run_dir / "checkpoints"))] == [20, 40]


def test_exact_resume_and_refusals(tmp_path, cache_dir):
    """6 iterations straight == 3 iterations, then resumed to 6 (identical losses, fp32 CPU); a
    resume with another layout or S2 config is refused."""
    schedule = ["train.lr_decay_iters=6"]
    _run(tmp_path / "straight", cache_dir, "train.iters=6", *schedule)
    first = _run(tmp_path / "resumed", cache_dir, "train.iters=3", *schedule)
    assert first["iteration"] == 3 and latest_checkpoint(str(tmp_path / "resumed" / "checkpoints"))
    second = _run(tmp_path / "resumed", cache_dir, "train.iters=6", *schedule)
    assert second["iteration"] == 6
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == straight       # exact: every loss after the resume equals the straight run's

    with pytest.raises(ConfigError, match=r"^attention.layout=SS: .*iter_0000006 was saved with attention.layout=SD;"):
        _run(tmp_path / "resumed", cache_dir, "train.iters=8", "attention.layout=SS", *schedule)
    with pytest.raises(ConfigError, match=r"^attention.s2.local_blocks=1: .* was saved with attention.s2.local_blocks=2;"):
        _run(tmp_path / "resumed", cache_dir, "train.iters=8", "attention.s2.local_blocks=1", *schedule)


def test_non_finite_loss_stops_before_the_step(tmp_path, cache_dir):
    with pytest.raises(FloatingPointError, match="non-finite"):
        _run(tmp_path / "run", cache_dir, "train.iters=3", "train.warmup_iters=0", "train.lr=1e30",
             "train.clip_grad=0")
    assert complete_checkpoints(str(tmp_path / "run" / "checkpoints")) == []


KILL_DURING_SAVE = """
import os, signal, sys
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron_s2.training import checkpoint as ckpt

class DieWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

ckpt_dir = sys.argv[1]
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
parallel_state.initialize_model_parallel()
meta = ckpt.read_meta(ckpt.latest_checkpoint(ckpt_dir))
# The common part is written first, then the process dies while the sharded part is serialised.
state = {"progress": {"iteration": 6}, "poison": ShardedObject("poison", DieWhilePickled(), (1,), (0,), replica_id=0)}
ckpt.save_checkpoint(ckpt_dir, 6, state, meta, keep_last=2)
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, cache_dir):
    """The half-written save is ignored; the previous checkpoint loads and the run continues on
    the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    ckpt_dir = str(run_dir / "checkpoints")
    _run(tmp_path / "straight", cache_dir, "train.iters=6", "train.lr_decay_iters=6")
    _run(run_dir, cache_dir, "train.iters=4", "checkpoint.interval=2", "train.lr_decay_iters=6")
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, ckpt_dir], env=_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert os.path.isdir(os.path.join(ckpt_dir, "tmp_iter_0000006"))
    assert latest_checkpoint(ckpt_dir).endswith("iter_0000004")

    result = _run(run_dir, cache_dir, "train.iters=6", "checkpoint.interval=2", "train.lr_decay_iters=6")
    assert result["iteration"] == 6
    assert [r["iteration"] for r in _records(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    assert [i for i, _ in complete_checkpoints(ckpt_dir)] == [4, 6]
    assert not os.path.exists(os.path.join(ckpt_dir, "tmp_iter_0000006"))


def _torchrun(tmp_path, run_dir, cache_dir, *overrides):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", PRETRAIN,
         *TINY, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["parallel.tp=2", "parallel.tp=1", "parallel.cp=2"])
def test_two_processes_match_one(tmp_path, cache_dir, parallel):
    """tp=2 (or dp=2, or cp=2) on two gloo processes gives the single-process losses (fp32, same seed), and
    its checkpoint resumes in one process (resharded by dist_checkpointing) on the same track.
    The vocabulary is padded to a multiple of 128 * tp: pad every run to the same size."""
    tp = int(parallel.split("=")[1]) if parallel.startswith("parallel.tp") else 1
    schedule = ["train.lr_decay_iters=6"]
    _run(tmp_path / "single", cache_dir, "train.iters=6", "model.make_vocab_size_divisible_by=256", *schedule)
    _torchrun(tmp_path, tmp_path / "pair", cache_dir, "train.iters=4", parallel,
              f"model.make_vocab_size_divisible_by={256 // tp}", *schedule)
    _run(tmp_path / "pair", cache_dir, "train.iters=6", "model.make_vocab_size_divisible_by=256", *schedule)
    single, pair = _losses(tmp_path / "single"), _losses(tmp_path / "pair")
    assert sorted(pair) == list(range(1, 7))
    for i in single:
        assert pair[i] == pytest.approx(single[i], rel=1e-5), (i, single, pair)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["parallel.tp=1", "parallel.tp=2", "parallel.cp=2"], ids=["dp2", "tp2", "cp2"])
def test_default_recipe_on_two_processes(tmp_path, cache_dir, parallel):
    """`torchrun --nproc_per_node=2 scripts/pretrain.py` with the default recipe (dp=2, or tp=2, or
    cp=2; the global batch follows micro batch x dp): it trains, the loss falls, and a run stopped
    at step 3 and relaunched ends on the straight run's losses, bit for bit."""
    short = ["train.iters=6", "train.lr_decay_iters=6", "train.warmup_iters=1", "train.eval_interval=0",
             "logging.interval=1", "logging.wandb.mode=disabled", parallel]

    def launch(run_dir, *overrides):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", PRETRAIN,
             *short, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides],
            env=_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "FutureWarning" not in result.stderr, result.stderr[-3000:]     # our collectives are current
        return result.stdout

    straight = launch(tmp_path / "straight")
    dp = 2 if parallel == "parallel.tp=1" else 1
    assert f"global batch {8 * dp} = micro 8 x dp {dp} x accumulation 1" in straight
    launch(tmp_path / "resumed", "train.iters=3")
    launch(tmp_path / "resumed")
    losses = _losses(tmp_path / "straight")
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1] - 0.3, losses
    assert _losses(tmp_path / "resumed") == losses
