"""Which optional accelerators this process found and which fallbacks it uses, in one line.

Megatron-Core announces each of its fallbacks (no TransformerEngine, no Apex) with a warning when
it is imported: a dozen lines per process, even for ``--help``. Our entry points call
``quiet_fallback_notices()`` before their first Megatron import, which hides exactly those
messages, and the trainer prints ``describe()`` once instead. Importing this module imports no
Megatron and changes no warning filter.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings

# The import-time notices of megatron.core (optimizer, clip_grads, models.backends,
# gpt_layer_specs, megatron_fsdp): "Transformer Engine and Apex are not installed. Falling back
# to ..." and "Apex is not installed. Falling back to Torch Norm".
FALLBACK_NOTICES = r"(Transformer Engine and Apex are|Apex is) not installed"


def quiet_fallback_notices() -> None:
    """Hide Megatron-Core's fallback notices (by message) in this process; for entry points."""
    warnings.filterwarnings("ignore", message=FALLBACK_NOTICES, category=UserWarning)


def _version(package: str, module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "found"


def describe(cuda: bool) -> str:
    """One line: the accelerators found (CUDA, TransformerEngine, Apex, Triton) and what each
    layer kind runs on here, e.g. ``accelerators: CUDA no, TransformerEngine no, Apex no, Triton
    3.9.0 | S2 layers: PyTorch block-sparse path (Triton runs on CUDA) | dense layers: torch SDPA
    | norms, optimizer: torch (Megatron's fallbacks)``."""
    te = _version("transformer_engine", "transformer_engine")
    apex = _version("apex", "apex")
    triton = _version("triton", "triton")
    found = ", ".join(f"{name} {version or 'no'}" for name, version in
                      (("TransformerEngine", te), ("Apex", apex), ("Triton", triton)))
    sparse = ("Triton kernels" if cuda and triton else
              "PyTorch block-sparse path" + (" (Triton runs on CUDA)" if triton else ""))
    dense = "TransformerEngine attention" if te else "torch SDPA"
    fused = "TransformerEngine/Apex" if te or apex else "torch (Megatron's fallbacks)"
    return (f"accelerators: CUDA {'yes' if cuda else 'no'}, {found} | S2 layers: {sparse} | "
            f"dense layers: {dense} | norms, optimizer: {fused}")
