"""The repository root is importable (``python -m pytest``, ``python -c`` and notebooks put it on
``sys.path``), so no folder there may be a regular package named like an installed library:
``kernels/`` holds the ``s2attn`` package but is no package itself, and transformers, which probes
for Hugging Face's ``kernels`` package, imports its model classes from the root."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_model_classes_import_from_the_repository_root():
    pytest.importorskip("transformers")
    code = "from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_s2attn_is_the_kernel_library_from_the_repository_root():
    out = subprocess.run([sys.executable, "-c", "import s2attn; print(s2attn.__file__)"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip()).parent == ROOT / "kernels" / "s2attn"
