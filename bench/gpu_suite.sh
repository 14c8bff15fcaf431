#!/usr/bin/env bash
# The GPU suite in one prepared device call (see bench/gpu_suite.py and docs/benchmarks.md).
#
# Here, once:   bash bench/gpu_wheels.sh        (wheels the GPU image lacks, into .whl/)
# Device call:  run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=590)
# Results come back as $OUT/gpu_suite.json and $OUT/gpu_suite.md (and one JSON per job).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  extra="/tmp/site"
fi
export PYTHONPATH="$PWD${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 bench/gpu_suite.py --out "${OUT:-outputs/gpu_suite}" "$@"
