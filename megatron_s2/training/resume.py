"""What a resumed run takes from its checkpoint besides the weights: the schedule and the batch.

The lr/weight-decay schedule (``SCHEDULE_KEYS``) is Megatron's ``OptimizerParamScheduler``, whose
state the checkpoint holds. Megatron-LM refuses a resume whose schedule differs from the
checkpoint's unless one of two flags says which to use; ``check_resume`` does the same, before any
process group exists, in one line naming the key and both values:

- ``train.use_checkpoint_opt_param_scheduler=true``: the checkpoint's values stay in force; they
  replace this config's, so config.yaml records them.
- ``train.override_opt_param_scheduler=true``: this config's values apply from the next step on.

The global batch counts the data position (consumed samples) and the tokens of every scheduled
step, so a resume whose global batch differs from the checkpoint's only because it was left null
(micro batch x data-parallel size: another number of processes) is refused; an explicit
``train.global_batch_size`` is the user's choice.

A checkpoint records both in its run.json (``run_record``); one saved before they were recorded is
read from Megatron's own scheduler state and data position in the checkpoint's common state.
"""
from __future__ import annotations

import os
import shlex
import sys
from types import SimpleNamespace

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from .config import LrDecayStyle, PretrainConfig
from .errors import ConfigError, show_value

SCHEDULE_KEYS = ("lr", "min_lr", "warmup_iters", "lr_decay_iters", "lr_decay_style", "weight_decay")
"""The train.* keys of the schedule, as Megatron's scheduler compares them on load."""


def schedule(cfg: PretrainConfig) -> dict:
    """The schedule a validated config asks for: {key in SCHEDULE_KEYS: plain value}."""
    return {key: show_value(getattr(cfg.train, key)) if key == "lr_decay_style" else getattr(cfg.train, key)
            for key in SCHEDULE_KEYS}


def run_record(cfg: PretrainConfig) -> dict:
    """What run.json records for ``check_resume``: the schedule in force and the global batch."""
    return {"schedule": schedule(cfg), "global_batch_size": cfg.train.global_batch_size}


def _saved(path: str, meta: dict) -> dict:
    """run_record of the checkpoint at ``path`` (its run.json ``meta``), or for an older checkpoint
    the same read from Megatron's scheduler state and data position in its common state."""
    if "schedule" in meta:
        return {"schedule": meta["schedule"], "global_batch_size": meta["global_batch_size"]}
    from megatron.core import dist_checkpointing
    common = dist_checkpointing.load_common_state_dict(path)
    s, progress = common["scheduler"], common["progress"]
    return {"schedule": {"lr": s["max_lr"], "min_lr": s["min_lr"], "warmup_iters": s["lr_warmup_steps"],
                         "lr_decay_iters": s["lr_decay_steps"], "lr_decay_style": s["lr_decay_style"],
                         "weight_decay": s["end_wd"]},
            "global_batch_size": progress["consumed_samples"] // max(progress["iteration"], 1)}


def lr_after(values: dict, steps: int) -> float:
    """The lr of the step after ``steps`` steps under the schedule ``values`` (SCHEDULE_KEYS),
    computed by Megatron's own OptimizerParamScheduler."""
    group = {}
    scheduler = OptimizerParamScheduler(
        SimpleNamespace(param_groups=[group]), init_lr=0.0, max_lr=values["lr"], min_lr=values["min_lr"],
        lr_warmup_steps=values["warmup_iters"], lr_decay_steps=values["lr_decay_iters"],
        lr_decay_style=values["lr_decay_style"], start_wd=values["weight_decay"],
        end_wd=values["weight_decay"], wd_incr_steps=values["lr_decay_iters"], wd_incr_style="constant")
    scheduler.step(steps)
    return group["lr"]


def _null_note(cfg: PretrainConfig, key: str) -> str:
    follows = {"train.lr_decay_iters": "train.iters", "train.global_batch_size": "micro batch x dp"}
    return f" (null: {follows[key]})" if key in cfg.derived else ""


def check_resume(cfg: PretrainConfig, meta: dict, path: str, note) -> None:
    """Refuse (ConfigError) or settle a resume from the checkpoint at ``path`` (run.json ``meta``):
    its global batch, then its schedule (module docstring). With
    train.use_checkpoint_opt_param_scheduler the checkpoint's schedule replaces ``cfg.train``'s;
    ``note`` reports a schedule that changes or is kept."""
    saved = _saved(path, meta)
    t, iteration = cfg.train, meta["iteration"]
    key = "train.global_batch_size"
    if t.global_batch_size != saved["global_batch_size"] and key in cfg.derived:
        gbs, dp = saved["global_batch_size"], t.global_batch_size // t.micro_batch_size
        if gbs % dp:
            fix = f"launch a number of processes whose data-parallel size divides {gbs}"
        else:
            micro = max(m for m in range(1, t.micro_batch_size + 1) if (gbs // dp) % m == 0)
            fix = f"set {key}={gbs}" + (f" train.micro_batch_size={micro}" if micro != t.micro_batch_size else "")
        raise ConfigError(key, t.global_batch_size, f"null makes it micro batch x dp = {t.micro_batch_size} x {dp} "
                          f"here, but {path} was trained with a global batch of {gbs}; the data position and "
                          f"the schedule count in global batches: {fix} to continue it on dp {dp}, or use a "
                          "new run.dir")

    now = schedule(cfg)
    changed = [k for k in SCHEDULE_KEYS if now[k] != saved["schedule"][k]]
    if not changed:
        return
    was = ", ".join(f"train.{k}={show_value(saved['schedule'][k])}" for k in changed)
    lr_kept, lr_new = lr_after(saved["schedule"], iteration), lr_after(now, iteration)
    if t.use_checkpoint_opt_param_scheduler:
        for k in changed:
            setattr(t, k, LrDecayStyle(saved["schedule"][k]) if k == "lr_decay_style" else saved["schedule"][k])
        note(f"train.use_checkpoint_opt_param_scheduler=true: keeping the checkpoint's {was} (config.yaml "
             f"records them); step {iteration + 1} trains at lr {lr_kept:.3g}")
        return
    if t.override_opt_param_scheduler:
        now_text = ", ".join(f"train.{k}={show_value(now[k])}" for k in changed)
        note(f"train.override_opt_param_scheduler=true: from step {iteration + 1} the schedule has {now_text} "
             f"(the checkpoint's: {was}); the lr goes from {lr_kept:.3g} to {lr_new:.3g}")
        return
    first = "train." + changed[0]
    raise ConfigError(first, now[changed[0]],
                      f"{path} was trained with {was}{_null_note(cfg, first)}; choose: "
                      f"train.use_checkpoint_opt_param_scheduler=true keeps the checkpoint's schedule (lr "
                      f"{lr_kept:.3g} at step {iteration + 1}), train.override_opt_param_scheduler=true takes "
                      f"this one from step {iteration + 1} (lr {lr_new:.3g})")


def command_with(overrides: list[str]) -> str:
    """This launch's command line with ``overrides`` (key=value) in place of its own values of those
    keys: ``python scripts/pretrain.py ...`` or, under a one-node torchrun, ``torchrun
    --nproc_per_node=N scripts/pretrain.py ...`` (in-process callers get the script's name)."""
    argv = sys.argv if sys.argv and sys.argv[0].endswith("pretrain.py") else ["scripts/pretrain.py"]
    replaced = {o.split("=", 1)[0] for o in overrides}
    kept = [a for a in argv[1:] if a.lstrip("+~").split("=", 1)[0] not in replaced]
    script = os.path.relpath(argv[0]) if not os.path.relpath(argv[0]).startswith("..") else argv[0]
    launcher = ["python"]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        nproc, world = os.environ.get("LOCAL_WORLD_SIZE", "1"), os.environ.get("WORLD_SIZE", "1")
        launcher = ["torchrun", f"--nproc_per_node={nproc}"] + ([] if nproc == world else ["..."])
    return shlex.join(launcher + [script] + kept + overrides)


def complete_message(cfg: PretrainConfig, meta: dict, path: str) -> str:
    """What a rerun of a finished run says: nothing to do, the command that trains on with the
    checkpoint's schedule, and what the other choice changes."""
    iteration, saved = meta["iteration"], _saved(path, meta)["schedule"]
    more, follows = 2 * iteration, "train.lr_decay_iters" in cfg.derived
    override = {**schedule(cfg), **({"lr_decay_iters": more} if follows else {})}
    keep = command_with([f"train.iters={more}", "train.use_checkpoint_opt_param_scheduler=true"])
    return (f"run.dir {cfg.run.dir} is complete: its checkpoint {os.path.basename(path)} is at train.iters="
            f"{cfg.train.iters}, nothing to do. To train on with the same schedule (lr "
            f"{lr_after(saved, iteration):.3g} from step {iteration + 1}): {keep}; with "
            f"train.override_opt_param_scheduler=true instead, this config's schedule applies from step "
            f"{iteration + 1} (lr {lr_after(override, iteration):.3g} there"
            + (", decaying over the new train.iters" if follows else "") + "). For a new run use a new run.dir")
