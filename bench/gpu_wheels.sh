#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the pure-Python wheels that the GPU image lacks into
# .whl/ (git-ignored), for bench/gpu_suite.sh. The GPU image already has jax (CUDA), flax, optax,
# orbax, chex, safetensors, torch, numpy, scipy, absl, PyYAML.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl ml_collections==1.1.0
ls .whl
