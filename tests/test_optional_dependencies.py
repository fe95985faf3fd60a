"""The kernel library, its tests and its benchmark need torch and triton alone: in a fresh
interpreter where megatron-core, hydra, omegaconf and wandb cannot be imported (a GPU machine as
shipped), ``scripts/bench_attention.py`` runs, and the test suite collects without errors, the
Megatron-dependent modules skipped with the missing package named."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import OPTIONAL_PACKAGES

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent(f"""
    import sys

    class _Absent:
        '''Import as if these packages were not installed.'''
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in {sorted(OPTIONAL_PACKAGES)!r}:
                raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
            return None

    sys.meta_path.insert(0, _Absent())
""")


@pytest.fixture(scope="module")
def run_without_optional(tmp_path_factory):
    """Run a command (argv after the interpreter) with the optional packages blocked."""
    site = tmp_path_factory.mktemp("absent")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))

    def run(*argv, timeout=300):
        return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    return run


@pytest.mark.parametrize("module", sorted(OPTIONAL_PACKAGES))
def test_the_packages_are_really_blocked(run_without_optional, module):
    out = run_without_optional("-c", f"import {module}")
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, out.stderr


def test_attention_benchmark_runs(run_without_optional, tmp_path):
    assert run_without_optional("scripts/bench_attention.py", "--help").returncode == 0
    out = run_without_optional("scripts/bench_attention.py", "--preset", "cpu", "--seq-lens", "256", "--repeats", "1",
                               "--memory-seq-len", "0", "--no-flex", "--json", str(tmp_path / "b.json"),
                               "--figure", str(tmp_path / "b.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "b.json").exists() and (tmp_path / "b.png").exists()


# hydra-core registers a pytest plugin, which a machine without hydra does not have
PYTEST = ("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:hydra_pytest")


def test_suite_collects_and_skips_megatron_modules(run_without_optional):
    out = run_without_optional(*PYTEST, "-rs")
    assert out.returncode == 0, out.stdout + out.stderr
    collected = out.stdout
    assert "error" not in collected.splitlines()[-1], collected       # "N tests collected, M errors"
    for kernel_test in ("test_layout.py::", "test_torch_attention.py::", "test_triton_attention.py::",
                        "test_triton_compile.py::"):
        assert kernel_test in collected, f"{kernel_test} not collected"
    assert "test_megatron_model.py needs megatron-core (not installed" in collected
    assert "test_train_config.py needs " in collected         # hydra, omegaconf or megatron


def test_gpu_tests_collect(run_without_optional):
    out = run_without_optional(*PYTEST, "-m", "gpu")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "error" not in out.stdout.splitlines()[-1], out.stdout
    assert "test_triton_attention.py::test_gpu_" in out.stdout
