#!/usr/bin/env bash
# One prepared run for a GPU machine, figures first, within GPU_CHECK_TOTAL_S (default 480 s: 8 minutes on one H200):
#   1. the carried wheels: diffusers and what it needs from .whl/ (filled by benchmarks/gpu_wheels.sh where pip
#      reaches PyPI; the GPU machine has no network); without them the diffusers rows are skipped
#   2. the build: the CPU kernels for this CPU's ISA only (DDPM_FAST_CPU_ISA) and the CUDA kernels; if the CUDA
#      build fails, the CPU build alone (DDPM_FAST_NO_CUDA=1), so the Triton rows still run
#   3. benchmarks/gpu_check.py ${GPU_CHECK_ARGS:---quick} --budget <what is left, less the tests' share>
#   4. the GPU tests (Triton kernels on CUDA tensors, the CUDA kernels, the captured sampler) with the time left
# Everything is logged under $OUT (default out/gpu_check, relative to the repository) as it is written:
# run.log (this script and the install), build.log, gpu_check.log, gpu_check.json, gpu_tests.log.
# Triton autotuning is off (DDPM_FAST_TRITON_AUTOTUNE=0: each kernel's heuristic configuration), so the first
# run compiles each kernel once rather than once per configuration.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export DDPM_FAST_TRITON_AUTOTUNE=${DDPM_FAST_TRITON_AUTOTUNE:-0}
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL_S:-480}
TESTS_S=${GPU_TESTS_S:-90}  # kept for step 4
start=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - start) )); }
log() { echo "[gpu_check.sh $(( $(date +%s) - start )) s] $*" | tee -a "$OUT/run.log"; }
# seconds for a step: min(limit, time left - reserve), at least 10 (timeout 0 would mean no limit)
cap() { local n; n=$(( $(left) - $2 )); [ "$n" -gt "$1" ] && n=$1; [ "$n" -lt 10 ] && n=10; echo "$n"; }

log "start: $(hostname), $("$PY" -V 2>&1), OUT=$OUT, total ${TOTAL} s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/run.log"

# 1. wheels
if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  if ! "$PY" -m pip install --no-index --find-links .whl diffusers 2>&1 | tee -a "$OUT/run.log"; then
    log "resolving diffusers' dependencies failed; installing the carried diffusers and importlib_metadata alone"
    "$PY" -m pip install --no-index --no-deps .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
      .whl/lazy_importer-*.whl 2>&1 | tee -a "$OUT/run.log"
  fi
else
  log "no .whl/diffusers-*.whl (bash benchmarks/gpu_wheels.sh fills .whl/): diffusers rows only if it is installed"
fi
"$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/run.log"

# 2. build: one CPU variant, the one torch's reading of this CPU selects (ddpm_fast/_ext.py picks the same)
ISA=$("$PY" -c "import torch; c = torch.backends.cpu.get_cpu_capability().upper(); print('avx512' if c.startswith('AVX512') or c == 'AMX' else 'avx2' if c == 'AVX2' else 'default')" 2>/dev/null || echo avx2)
export DDPM_FAST_CPU_ISA=${DDPM_FAST_CPU_ISA:-$ISA}
JOBS=$(nproc 2>/dev/null || echo 8)
build() {  # pip's editable install: setup.py maps ddpm_fast.kernels to kernels/
  MAX_JOBS=$JOBS timeout "$1" "$PY" -m pip install -v --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
}
log "build: DDPM_FAST_CPU_ISA=$DDPM_FAST_CPU_ISA, CUDA kernels, MAX_JOBS=$JOBS (log: build.log)"
if build "$(cap 300 200)"; then
  log "build done"
else
  log "CUDA build failed or timed out (see build.log); building without it (DDPM_FAST_NO_CUDA=1)"
  echo "==== DDPM_FAST_NO_CUDA=1 ====" >> "$OUT/build.log"
  DDPM_FAST_NO_CUDA=1 build "$(cap 240 150)" || log "the CPU-only build failed too (see build.log)"
fi
tail -5 "$OUT/build.log" | tee -a "$OUT/run.log"
"$PY" -c "import torch, triton, ddpm_fast; print(torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), ddpm_fast.backends())" \
  2>&1 | tee -a "$OUT/run.log"

# 3. the figures
budget=$(( $(left) - TESTS_S - 30 ))
[ "$budget" -lt 30 ] && budget=30
log "gpu_check.py ${GPU_CHECK_ARGS---quick} --budget $budget (log: gpu_check.log)"
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of arguments
timeout "$(cap 100000 "$TESTS_S")" "$PY" benchmarks/gpu_check.py --json "$OUT/gpu_check.json" ${GPU_CHECK_ARGS---quick} \
  --budget "$budget" 2>&1 | tee "$OUT/gpu_check.log"
log "gpu_check.py exit ${PIPESTATUS[0]}"

# 4. the GPU tests with the time left
t=$(cap 100000 5)
if [ "$t" -gt 20 ]; then
  log "GPU tests, ${t} s (log: gpu_tests.log)"
  # the Triton tests still run if the CPU build failed (logged above); tests/conftest.py would stop the session
  DDPM_FAST_ALLOW_NO_EXT=1 timeout "$t" "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/ops/test_cuda_backend.py \
    tests/ops/test_triton.py 2>&1 | tee "$OUT/gpu_tests.log"
  log "GPU tests exit ${PIPESTATUS[0]} (124: cut at the time limit)"
else
  log "no time left for the GPU tests"
fi
log "done"
