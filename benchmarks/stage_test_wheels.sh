#!/usr/bin/env bash
# Adds pytest's wheels to the first half of the staged MLX CUDA build (.mlxcuda/a, made by the
# device's stage-mlx-cuda), for `bash benchmarks/h100.sh SIZE cuda-tests` on a machine without a
# package registry. Run here, in the repository's root, after staging (staging starts afresh).
set -euo pipefail
[ -d .mlxcuda/a ] || { echo "no .mlxcuda/a here: stage MLX's CUDA build first" >&2; exit 2; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .mlxcuda/a pytest pluggy iniconfig packaging pygments
ls .mlxcuda/a | grep -E '^(pytest|pluggy|iniconfig|packaging|pygments)-'
