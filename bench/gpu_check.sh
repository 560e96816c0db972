#!/usr/bin/env bash
# One prepared run on a machine with a real NVIDIA GPU (see README "Checking on a real GPU").
# Needs nothing from the network: pydantic and friends travel as wheels in .whl/ when the machine lacks them.
# Never changes the card's settings (no nvidia-smi -pl / -r / -pm / clocks / MIG).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv | tee "$OUT/gpu.txt"
nvidia-smi -q -d POWER | tee -a "$OUT/gpu.txt" | head -60
PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
