#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no
# network: diffusers and the packages it imports that such a machine may lack, for CPython 3.12 on x86-64 Linux.
# Run it where pip reaches PyPI; gpu_check.sh then runs `pip install --no-index --find-links .whl diffusers`,
# which takes from .whl only what the machine's own packages do not already satisfy.
#
#   bash benchmarks/gpu_wheels.sh            # PYTHON=... for another pip; WHEEL_DIR=... for another folder
#
# What the H200 image already has (torch 2.11, Triton 3.6, numpy, pillow, regex, requests, filelock,
# huggingface-hub 1.33, safetensors 0.8, tqdm, ninja, pybind11, setuptools, wheel, zipp) is still fetched where
# it is small, so an image without one of them works too; importlib_metadata is the one diffusers needs that it
# lacks (with lazy-importer, which it needs). The versions are pinned: diffusers' as the tests use it, the others those diffusers 0.42.1 accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${WHEEL_DIR:-.whl}
mkdir -p "$DIR"
# pure-Python wheels (py3-none-any)
PURE=(
  diffusers==0.42.1
  importlib_metadata==10.2.0
  lazy-importer==0.1.0
  zipp==4.1.2
  tqdm==4.70.1
  pybind11==3.1.0
  filelock==4.3.1
)
# binary wheels, CPython 3.12 / manylinux x86-64
BINARY=(
  ninja==1.13.2
  safetensors==0.8.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_5_x86_64 manylinux_2_12_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d "$DIR" "${PURE[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${platforms[@]}" -d "$DIR" "${BINARY[@]}"
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels in $DIR ($(du -sh "$DIR" | cut -f1)):"
ls "$DIR"
