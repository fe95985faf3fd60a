#!/usr/bin/env bash
# Download the Python packages that a CUDA machine with torch and triton but no registry access
# lacks, as wheels for CPython 3.12 on manylinux x86_64, into DIR (default .whl, git-ignored):
# megatron-core, hydra-core, omegaconf, and antlr4-python3-runtime, which PyPI has only as an sdist
# and so is built here as a pure-Python wheel. About 3 MiB. wandb is not needed (the trainer imports
# it only when logging to it). scripts/gpu_check.sh installs what it finds in DIR.
#
#   scripts/fetch_gpu_wheels.sh [DIR]
#
# Their other requirements (torch, numpy, packaging, PyYAML) are on such machines already.
set -euo pipefail

dest=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dest"

platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --dest "$dest" megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1
"$python" -m pip wheel --quiet --no-deps --no-binary=:all: --wheel-dir "$dest" antlr4-python3-runtime==4.9.3

du -ch "$dest"/*.whl
