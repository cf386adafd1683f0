#!/usr/bin/env bash
# The test command of the README: installs the requirements, builds the extension against the installed torch,
# then runs the whole suite (the Triton kernels through TRITON_INTERPRET=1 on CPU tensors).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m pip install -q --no-build-isolation -e .
python -c "import ddpm_fast; print('ddpm_fast backends:', ddpm_fast.backends())"
# Triton 3.6 (the GPU machine's compiler) in its own cached environment, for the ahead-of-time compile check
# (tests/test_triton_aot.py); without a network the check runs under the installed Triton only.
T36="${DDPM_FAST_TRITON36_ENV:-$HOME/.cache/ddpm_fast/triton36}"
if ! "$T36/bin/python" -c "import triton; assert triton.__version__ == '3.6.0'" 2>/dev/null; then
    { python -m venv --system-site-packages "$T36" && "$T36/bin/python" -m pip install -q triton==3.6.0; } \
        || echo "tests/run.sh: could not make the Triton 3.6 environment in $T36; its compile check is skipped"
fi
python -m pytest -q "$@"
