"""Launch a worker script under torchrun (gloo, localhost) and return the JSON it writes."""
import json
import os
import subprocess
import sys
from pathlib import Path


def run_workers(worker: Path, nproc: int, out: Path, *args: str, timeout: int = 300) -> dict:
    # --standalone lets the rendezvous pick a free localhost port; one thread per process on 2 cores.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(worker), str(out), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())
