"""Launch a worker script under torchrun (gloo, localhost) and return the JSON it writes; ``launch``
runs any such command with a timeout that ends torchrun's workers too."""
import json
import os
import subprocess
import sys
from pathlib import Path


def torchrun_command(worker: Path, nproc: int, *args: str) -> list[str]:
    # --standalone lets the rendezvous pick a free localhost port.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(worker), *map(str, args)]


def launch(command: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` under ``timeout`` seconds, except
    that on the timeout (or any exception, e.g. pytest-timeout's) the command gets SIGTERM first and
    SIGKILL 10 s later: torchrun forwards SIGTERM to its workers, which run in sessions of their own
    and would outlive a torchrun killed outright. Re-raises the exception (TimeoutExpired)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_workers(worker: Path, nproc: int, out: Path, *args: str, timeout: int = 300) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")      # one thread per process on 2 cores
    proc = launch(torchrun_command(worker, nproc, out, *args), timeout, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())
