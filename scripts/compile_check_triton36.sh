#!/usr/bin/env bash
# The ahead-of-time compile test (tests/test_triton_compile.py) under triton 3.6, the version on
# the GPU machine we borrow, where CI has a newer one. Makes a virtual environment that sees this
# interpreter's packages (torch, pytest, the project) with triton 3.6.0 installed over them, then
# runs the test there. Needs a package registry once; a few minutes per run on 2 cores.
#
#   scripts/compile_check_triton36.sh [VENV_DIR] [PYTEST_ARGS...]     # default VENV_DIR /tmp/triton36
set -euo pipefail

venv=${1:-/tmp/triton36}
shift || true
cd "$(dirname "$0")/.."
if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --quiet --no-deps triton==3.6.0
fi
"$venv/bin/python" -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__; print('triton', triton.__version__)"
exec "$venv/bin/python" -m pytest tests/test_triton_compile.py -q -p no:cacheprovider "$@"
