"""megatron-s2: hybrid S2-sparse / dense attention for Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="megatron-s2",
    version="0.1.0",
    description="S2-Attention (sparsely-sharded block-sparse attention) kernels and Megatron-Core integration",
    python_requires=">=3.11",
    # The kernel library is the package kernels/s2attn/, installed as `s2attn`. kernels/ itself has
    # no __init__.py: a regular top-level `kernels` package (importable from the repository root)
    # would shadow Hugging Face's `kernels` package, which transformers probes for.
    packages=["s2attn"] + find_packages(include=["megatron_s2", "megatron_s2.*"]),
    package_dir={"s2attn": "kernels/s2attn", "megatron_s2": "megatron_s2"},
    install_requires=[
        "torch>=2.6,<2.15",
        "triton>=3.2",
        "numpy",
        "megatron-core>=0.16.1,<0.20",
        "hydra-core>=1.3,<1.4",
        "wandb>=0.19",
        "matplotlib>=3.7",
    ],
    extras_require={
        "hf": ["transformers>=5.0,<6", "safetensors>=0.4"],
        "test": ["pytest>=8", "transformers>=5.0,<6", "safetensors>=0.4"],
    },
)
