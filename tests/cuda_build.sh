#!/usr/bin/env bash
# Builds ddpm_fast._C_cuda the way a GPU user's install does, on a machine without a GPU: a separate environment
# with the CUDA build of torch (2.13.0+cu130, which imports without a device), `pip install --no-build-isolation -e .`
# of a copy of this checkout, then checks that _C_cuda imports and registers a CUDA kernel for every op that
# csrc/cuda_bindings.cpp implements, under the schema csrc/bindings.cpp defines. No kernel runs.
#
# The environment and the source copy are cached next to each other (DDPM_FAST_CUDA_ENV, default
# ~/.cache/ddpm_fast/cuda-env, and <env>-src): the copy keeps this checkout's CPU-torch .so files untouched, and
# its build/ folder keeps ninja's objects, so a rerun compiles only the sources that changed.
#
# Exit status: 0 built and registered; 3 torch+cu130 (or a build dependency) could not be fetched, so the check did
# not run; anything else is a failure. DDPM_FAST_CPU_ISA picks the one CPU variant built (default: "default").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV_DIR="${DDPM_FAST_CUDA_ENV:-$HOME/.cache/ddpm_fast/cuda-env}"
ENV_DIR="${ENV_DIR%/}"
SRC="$ENV_DIR-src"
PY="$ENV_DIR/bin/python"
TORCH_VERSION=2.13.0
# --isolated: this machine's pip configuration caps torch to the local CPU wheel; the CUDA build comes from PyPI.
PIP=("$PY" -m pip --isolated --disable-pip-version-check)
[ -f /etc/ssl/certs/ca-certificates.crt ] && PIP+=(--cert /etc/ssl/certs/ca-certificates.crt)
log() { echo "cuda build: $*"; }
now() { date +%s; }
start=$(now)

mkdir -p "$(dirname "$ENV_DIR")"
# Two checks at once would share the environment and the objects: the second waits.
exec 9>"$ENV_DIR.lock"
flock 9

# 1. The environment: torch with CUDA 13 and the build dependencies, installed once.
[ -x "$PY" ] || python3 -m venv "$ENV_DIR"
cuda_of_torch() { "$PY" -c "import torch; print(torch.version.cuda or 'none')" 2>/dev/null || echo missing; }
if [ "$(cuda_of_torch)" = missing ]; then
    log "installing torch==$TORCH_VERSION (the CUDA build, ~3 GB with its nvidia libraries) into $ENV_DIR"
    if ! "${PIP[@]}" install -q "torch==$TORCH_VERSION" >"$ENV_DIR.pip.log" 2>&1; then
        tail -n 5 "$ENV_DIR.pip.log"
        log "SKIPPED: could not fetch torch==$TORCH_VERSION+cu130 from PyPI (network?); full log in $ENV_DIR.pip.log"
        exit 3
    fi
fi
torch_cuda="$(cuda_of_torch)"
case "$torch_cuda" in
    13.*) ;;
    *) log "FAILED: torch in $ENV_DIR has CUDA '$torch_cuda', expected 13.x (rm -r $ENV_DIR to start over)"; exit 1 ;;
esac
if ! "$PY" -c "import setuptools, wheel, ninja, numpy, pybind11, tqdm" 2>/dev/null; then
    if ! "${PIP[@]}" install -q setuptools wheel ninja numpy pybind11 tqdm >"$ENV_DIR.pip.log" 2>&1; then
        tail -n 5 "$ENV_DIR.pip.log"
        log "SKIPPED: could not fetch the build dependencies from PyPI (network?); full log in $ENV_DIR.pip.log"
        exit 3
    fi
fi
env_done=$(now)

# 2. The source copy: tracked files only (no .so, no build/), and only those whose content changed are rewritten,
# so unchanged sources keep their timestamps and ninja does not recompile them.
"$PY" - "$ROOT" "$SRC" <<'EOF'
import filecmp, os, shutil, subprocess, sys

root, dst = sys.argv[1], sys.argv[2]
try:
    out = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, check=True).stdout
    files = [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(root, f))]
except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but build outputs
    skip_dirs = {".git", "build", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "out"}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip_dirs and not x.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(d, n), root) for n in names if not n.endswith((".so", ".o", ".pyc"))]
wanted = set(files)
changed = 0
for f in files:
    s, d = os.path.join(root, f), os.path.join(dst, f)
    if os.path.isfile(d) and filecmp.cmp(s, d, shallow=False):
        continue
    os.makedirs(os.path.dirname(d), exist_ok=True)
    shutil.copyfile(s, d)
    shutil.copymode(s, d)
    changed += 1
manifest = os.path.join(dst, ".copied-files")
old = set(open(manifest).read().split("\n")) - {""} if os.path.exists(manifest) else set()
for f in old - wanted:  # removed from the checkout since the last copy
    if os.path.isfile(os.path.join(dst, f)):
        os.remove(os.path.join(dst, f))
with open(manifest, "w") as fh:
    fh.write("\n".join(sorted(wanted)))
print(f"cuda build: source copy in {dst}: {len(files)} files, {changed} written")
EOF
copy_done=$(now)

# 3. The build, as a user's install runs it (one CPU variant: the CUDA module needs one to define the op schemas).
export DDPM_FAST_CPU_ISA="${DDPM_FAST_CPU_ISA:-default}"
export MAX_JOBS="${MAX_JOBS:-2}"
unset DDPM_FAST_NO_CUDA
build_log="$SRC/build.log"
log "building in $SRC (DDPM_FAST_CPU_ISA=$DDPM_FAST_CPU_ISA, MAX_JOBS=$MAX_JOBS; log: $build_log)"
if ! (cd "$SRC" && "${PIP[@]}" install -v --no-build-isolation --no-deps -e .) >"$build_log" 2>&1; then
    tail -n 60 "$build_log"
    log "FAILED: pip install -e . (full log: $build_log)"
    exit 1
fi
grep -E "^ *ddpm_fast: " "$build_log" | sort -u || true
compiled=$(grep -cE "^\s*\[[0-9]+/[0-9]+\] " "$build_log" || true)
log "ninja steps run: $compiled"
build_done=$(now)
log "times: environment $((env_done - start)) s, copy $((copy_done - env_done)) s, build $((build_done - copy_done)) s"

# 4. The check, in the environment's python, from the copy's sources.
cd "$SRC"
"$PY" - <<'EOF'
import re
import sys

import torch

import ddpm_fast
from ddpm_fast import _ext
from ddpm_fast.ops._cuda import NATIVE_OPS


def cpp_strings(call):  # the concatenated C++ string literals of one call's argument
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))


print(f"cuda build: torch {torch.__version__} (CUDA {torch.version.cuda}); ddpm_fast from {ddpm_fast.__file__}")
print(f"cuda build: CPU module {_ext.cpu_module().__name__}; backends {ddpm_fast.backends()}")
if _ext.cuda_unavailable_reason() is not None:
    sys.exit(f"cuda build: FAILED: ddpm_fast._C_cuda did not load: {_ext.cuda_unavailable_reason()}")
print(f"cuda build: {_ext._cuda_module.__name__} loaded from {_ext._cuda_module.__file__}")

bindings = open("csrc/bindings.cpp").read()
library = re.search(r"TORCH_LIBRARY\(ddpm_fast, m\) \{(.*?)\n\}", bindings, re.S).group(1)
defined = {}
for call in re.findall(r"m\.def\((.*?)\);", library, re.S):
    schema = cpp_strings(call)
    defined[schema.split("(", 1)[0]] = schema
glue = open("csrc/cuda_bindings.cpp").read()
impl_block = re.search(r"TORCH_LIBRARY_IMPL\(ddpm_fast, CUDA, m\) \{(.*?)\n\}", glue, re.S).group(1)
implemented = re.findall(r'm\.impl\("(\w+)"', impl_block)

problems = []
if set(implemented) != NATIVE_OPS:
    problems.append(f"csrc/cuda_bindings.cpp implements {sorted(implemented)}, ops/_cuda.py says {sorted(NATIVE_OPS)}")
ops = sorted(set(implemented) | NATIVE_OPS)
missing = []
for op in ops:
    name = f"ddpm_fast::{op}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
        missing.append(op)
        print(f"  MISSING CUDA kernel: {name}")
        continue
    schema = getattr(torch.ops.ddpm_fast, op).default._schema
    if op not in defined or schema != torch._C.parse_schema(f"ddpm_fast::{defined[op]}"):
        problems.append(f"{name}: registered schema {schema} differs from csrc/bindings.cpp's {defined.get(op)!r}")
    print(f"  CUDA {schema}")
for p in problems:
    print(f"cuda build: FAILED: {p}")
print(f"cuda build: {len(ops) - len(missing)} CUDA ops registered, {len(missing)} missing")
sys.exit(1 if missing or problems else 0)
EOF
