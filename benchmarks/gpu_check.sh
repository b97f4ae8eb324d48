#!/usr/bin/env bash
# One go on a machine with an NVIDIA GPU (see docs/benchmarks.md): build in place for the local GPU,
# run the CUDA tests, then the benchmarks, and print a short table. Uses the machine's own Python
# (torch, nvcc, pytest, dask, xarray, scikit-learn preinstalled); pymks is optional there.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/pymks-vae-gpu}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" setup.py -q build_ext --inplace 2>&1 | tail -3 | tee "$OUT/build.log"
"$PY" -c "import pymks_vae, json; print(json.dumps(pymks_vae.build_info()))" | tee "$OUT/build_info.json"
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_two_point.py tests/test_loss.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -3
"$PY" benchmarks/bench_two_point.py --json "$OUT/bench_two_point.json" 2>&1 | tee "$OUT/bench_two_point.md" | tail -12
"$PY" benchmarks/bench_loss.py --json "$OUT/bench_loss.json" 2>&1 | tee "$OUT/bench_loss.md" | tail -8
echo
echo "== summary =="
grep -E "passed|failed" "$OUT/cuda_tests.log" | tail -1
grep -E "^\| cuda" "$OUT/bench_two_point.md" "$OUT/bench_loss.md" || echo "(no CUDA rows)"
