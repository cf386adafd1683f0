#!/usr/bin/env bash
# The test command of the README: installs the requirements, builds the extension against the installed torch,
# then runs the whole suite (the Triton kernels through TRITON_INTERPRET=1 on CPU tensors).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m pip install -q --no-build-isolation -e .
python -c "import ddpm_fast; print('ddpm_fast backends:', ddpm_fast.backends())"
python -m pytest -q "$@"
