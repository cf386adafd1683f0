#!/usr/bin/env bash
# One prepared run for a GPU machine: install + build, GPU tests, GPU benchmarks -> $OUT/gpu_check.json.
# Budget: under 8 minutes on one H200. The machine has no network: a diffusers wheel may be carried in
# wheels/ (pip download diffusers -d wheels on a machine with network); without it the diffusers rows are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
start=$(date +%s)
if ls wheels/diffusers-*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps wheels/*.whl || echo "diffusers wheel install failed"
fi
# the CUDA extension first; if it does not build, the CPU build alone (the Triton rows still run)
if ! MAX_JOBS=16 python -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.txt" 2>&1; then
  echo "CUDA build failed (log in build.txt); building without it"
  DDPM_FAST_NO_CUDA=1 MAX_JOBS=16 python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
fi
python -c "import ddpm_fast, torch; print(torch.cuda.get_device_name(), ddpm_fast.backends())" | tee "$OUT/backends.txt"
# GPU tests: the Triton kernels on CUDA tensors (no interpreter), the CUDA kernels, the captured CUDA-graph sampler
timeout 180 python -m pytest -q tests/ops/test_triton.py tests/ops/test_cuda_backend.py tests/test_graphs.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
echo "tests done after $(( $(date +%s) - start )) s"
timeout 300 python benchmarks/gpu_check.py --json "$OUT/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>&1 | tail -60 \
  | tee "$OUT/gpu_check.txt"
echo "gpu_check done after $(( $(date +%s) - start )) s"
