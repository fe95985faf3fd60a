"""The run's wandb side (rank 0): the mode in force, one offline run that holds the whole history,
and failures in one line. Never prompts; never blocks on the network in offline mode.

- Environment: wandb reads its WANDB_* variables itself, and one set to an empty string counts
  as unset here (wandb 0.31 refuses ``WANDB_MODE=`` with a validation error): ``start`` removes
  such variables from this process first.
- Mode (``wandb_mode``): logging.wandb.mode, or with ``auto`` the WANDB_MODE variable, or online
  when an API key is configured (WANDB_API_KEY or a netrc entry), else offline. Online without a
  key goes offline with one line naming the setting that asked for online.
- Offline across resumes: wandb writes a new offline-run folder per launch and cannot append to an
  old one. Each launch therefore logs the run's history so far (metrics.jsonl, which holds each
  iteration once, up to the resumed iteration) before its own steps, and then moves the earlier
  launches' folders of this run into ``wandb/superseded/``: the newest folder holds every logged
  step once, and ``wandb sync <it>`` uploads the whole run.
- Online across resumes: ``resume="allow"`` continues the server's run. Steps that an interrupted
  launch logged after its last checkpoint stay there: wandb keeps a run's steps increasing and
  drops the rerun's records of those steps (metrics.jsonl has the rerun's).
- Any failure of wandb is one line on stderr; the run goes on without wandb.
"""
from __future__ import annotations

import glob
import netrc
import os
import secrets
import shutil
import sys

from .config import PretrainConfig, WandbMode


def _clean_environment() -> None:
    """Remove the WANDB_* variables set to an empty string (unset, as far as we are concerned)."""
    for name in [n for n, v in os.environ.items() if n.startswith("WANDB_") and not v.strip()]:
        del os.environ[name]


def _credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: WandbMode) -> str:
    """The mode handed to wandb.init (see the module docstring); online without a key prints one
    line on stderr and returns offline."""
    if mode != WandbMode.auto:
        chosen, setting = mode.value, f"logging.wandb.mode={mode.value}"
    else:
        chosen = os.environ.get("WANDB_MODE", "").strip() or None
        setting = f"WANDB_MODE={chosen} (with logging.wandb.mode=auto)"
    if chosen is None:
        return "online" if _credentials() else "offline"
    if chosen == "online" and not _credentials():
        print(f"wandb: {setting} but no wandb API key is configured (WANDB_API_KEY or `wandb login`): "
              "logging offline instead; `wandb sync` uploads the run later", file=sys.stderr, flush=True)
        return "offline"
    return chosen


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def start(cfg: PretrainConfig, config: dict, history: list[dict], picture: str, start_iteration: int):
    """The wandb run of ``cfg.run.dir`` (None when disabled or failing): ``config`` its config,
    ``history`` the metrics.jsonl records so far (logged first when offline), ``picture`` a PNG
    logged as attention/pattern at ``start_iteration``."""
    _clean_environment()
    mode = wandb_mode(cfg.logging.wandb.mode)
    if mode == "disabled":
        return None
    try:
        import wandb
        id_path = os.path.join(cfg.run.dir, "wandb_id.txt")
        if not os.path.isfile(id_path):     # a resumed run continues the same wandb run
            with open(id_path, "w") as f:
                f.write(secrets.token_hex(4))
        with open(id_path) as f:
            run_id = f.read().strip()
        run = wandb.init(project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity,
                         name=cfg.run.name, id=run_id, resume="allow", dir=cfg.run.dir, mode=mode,
                         config=config, settings=wandb.Settings(console="off", silent=True, init_timeout=90))
        run.summary["attention/layout"] = cfg.attention.layout
        if mode == "offline":
            for record in history:
                log(run, record)
        try:
            run.log({"attention/pattern": wandb.Image(picture)}, step=start_iteration)
        except Exception:   # wandb.Image needs Pillow; the PNG stays in run.dir
            pass
        if mode == "offline":
            _supersede(cfg.run.dir, run_id, keep=run.settings.sync_dir)
        return run
    except Exception as e:
        print(f"wandb disabled: {_one_line(e)}", file=sys.stderr, flush=True)
        return None


def log(run, record: dict) -> None:
    """One metrics.jsonl record, at its iteration."""
    run.log({k: v for k, v in record.items() if k != "iteration" and v is not None}, step=record["iteration"])


def _supersede(run_dir: str, run_id: str, keep: str) -> None:
    """Move the earlier offline folders of this wandb run into <run.dir>/wandb/superseded/."""
    superseded = os.path.join(run_dir, "wandb", "superseded")
    for folder in glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}")):
        if os.path.abspath(folder) != os.path.abspath(keep):
            os.makedirs(superseded, exist_ok=True)
            shutil.move(folder, os.path.join(superseded, os.path.basename(folder)))


def finish(run) -> str | None:
    """Finish ``run``; returns its offline folder (None online): the whole run's history."""
    try:
        offline = run.settings.sync_dir if run.settings.mode == "offline" else None
        run.finish()
        return offline
    except Exception as e:
        print(f"wandb: finishing the run failed: {_one_line(e)}", file=sys.stderr, flush=True)
        return None
