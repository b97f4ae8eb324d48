#!/usr/bin/env bash
# One go on a machine with an NVIDIA GPU, in under 10 minutes (see docs/benchmarks.md): build in place
# for the local GPU's architecture, check that the CUDA kernels loaded, run the CUDA tests, the CUDA
# benchmark rows (operators, loss, training step), the operators' CPU tests on this machine's torch
# and a compute-sanitizer pass, then print one table, also written to OUT_DIR/summary.md.
#
# Uses the machine's own Python as it is. The lent machines have Python 3.12 and torch 2.11, and no
# dask, distributed or pymks (and no package registry): the tests that need those skip there.
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default: $OUT, else /tmp/pymks-vae-gpu)
# Environment: PYTHON (default python3), BUDGET_S (seconds for the whole check, default 540),
# SANITIZER=0 (skip the compute-sanitizer pass), TORCH_CUDA_ARCH_LIST (default: the local GPUs').
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/pymks-vae-gpu}}"
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-540}"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME MAX_S CMD...: runs CMD for at most MAX_S seconds, and never past the budget (less a
# reserve for the summary), output in $OUT/NAME.log; records the result in steps.tsv. A step that
# runs out of time is stopped, not waited for: the summary must come out in any case.
step() {
  local name=$1 max=$2
  shift 2
  local t=$((BUDGET_S - SECONDS - 20))
  ((t > max)) && t=$max
  if ((t < 15)); then
    printf '%s\tskipped\t0\tout of time\n' "$name" >> "$OUT/steps.tsv"
    echo "== $name: skipped (out of time)"
    return 1
  fi
  local start=$SECONDS rc=0
  timeout --kill-after=10 "$t" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  local status=ok note=""
  if ((rc == 124 || rc == 137)); then
    status=timeout note="stopped after $t s"
  elif ((rc != 0)); then
    status=failed note="exit $rc"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$note" >> "$OUT/steps.tsv"
  echo "== $name: $status ($((SECONDS - start)) s)"
  return $rc
}

finish() {
  echo
  "$PY" benchmarks/gpu_summary.py "$OUT"
  exit $?
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # Build for exactly the GPUs here: one architecture compiles in a fraction of the default list's time.
  TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d ' ' | sort -u | paste -sd';')"
fi
export TORCH_CUDA_ARCH_LIST
if [ -z "$TORCH_CUDA_ARCH_LIST" ]; then
  echo "gpu_check: nvidia-smi reports no GPU" >&2
  exit 1
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee "$OUT/stack.txt"

# The image's c++ is a GCC of its own (/opt/gcc) and may be newer than the libstdc++ the Python
# process loads (the system's, which torch was built against). libstdc++ runs code built by older
# compilers, not by newer ones: the first two checks there (2026-11-30) crashed in every kernel error
# message that formats a number, and torch 2.11 built here with the system's GCC 12 does not. So the
# check runs with the compiler's own libstdc++ loaded first where it is the newer one.
newest_glibcxx() { grep -a -o 'GLIBCXX_3\.4\.[0-9]*' "$1" 2> /dev/null | sort -V | tail -1; }
CXX_LIB="$(readlink -f "$("${CXX:-c++}" -print-file-name=libstdc++.so.6 2> /dev/null)" 2> /dev/null)"
PY_LIB="$("$PY" -c "import torch; print(next((l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l), ''))")"
PY_LIB="$(readlink -f "$PY_LIB" 2> /dev/null)"
{
  echo "c++: $("${CXX:-c++}" --version 2> /dev/null | head -1)"
  echo "compiler's libstdc++: ${CXX_LIB:-?} ($(newest_glibcxx "$CXX_LIB"))"
  echo "python's libstdc++:   ${PY_LIB:-?} ($(newest_glibcxx "$PY_LIB"))"
} | tee "$OUT/toolchain.txt"
if [ -f "$CXX_LIB" ] && [ -f "$PY_LIB" ] && [ "$CXX_LIB" != "$PY_LIB" ] &&
  [ "$(printf '%s\n%s\n' "$(newest_glibcxx "$CXX_LIB")" "$(newest_glibcxx "$PY_LIB")" | sort -V | tail -1)" = "$(newest_glibcxx "$CXX_LIB")" ] &&
  [ "$(newest_glibcxx "$CXX_LIB")" != "$(newest_glibcxx "$PY_LIB")" ]; then
  export LD_PRELOAD="$CXX_LIB${LD_PRELOAD:+:$LD_PRELOAD}"
  echo "LD_PRELOAD=$LD_PRELOAD (the compiler's libstdc++ is the newer)" | tee -a "$OUT/toolchain.txt"
fi

# The build: a failure stops the check (every later step would only repeat it), with the full log kept.
# A module left from an earlier build must not pass for this one.
rm -f pymks_vae/_C*.so
if ! step build 300 "$PY" setup.py build_ext --inplace; then
  echo "gpu_check: the build failed; the last lines of $OUT/build.log:" >&2
  tail -40 "$OUT/build.log" >&2
  finish
fi

# The diagnosis above, checked: an argument error whose message formats a number, raised through a
# registered operator, with the libstdc++ the check runs with (it must arrive as ValueError) and, in
# a separate process, without the preload (where the crash came from).
cat > "$OUT/value_error_probe.py" <<'PY'
import torch

import pymks_vae  # noqa: F401

x = torch.rand(2, 2, 6, 7, dtype=torch.float64)
try:
    torch.ops.pymks_vae.two_point_stats(x, [0, 5], [1, 1], True, [6, 7], None, 0)
except ValueError as exc:
    print("ValueError:", exc)
PY
step value_error_probe 30 "$PY" "$OUT/value_error_probe.py"
if [ -n "${LD_PRELOAD:-}" ]; then
  step value_error_probe_no_preload 30 env -u LD_PRELOAD "$PY" "$OUT/value_error_probe.py"
fi

# The CUDA kernels must be in the module and registered before any test runs: a build that silently
# dropped them would otherwise leave the CUDA tests nothing to test.
if ! step build_info 60 "$PY" - "$OUT/build_info.json" <<'PY'
import json
import sys

import torch

import pymks_vae

info = pymks_vae.build_info()
with open(sys.argv[1], "w") as f:
    json.dump(info, f)
print(json.dumps(info))
assert info["compiled"], f"pymks_vae._C did not load: {info.get('error')}"
assert info["cuda"], "pymks_vae._C holds no CUDA kernels"
assert info["cuda_available"], "torch sees no GPU"
for i in range(torch.cuda.device_count()):
    cap = "%d.%d" % torch.cuda.get_device_capability(i)
    # "9.0a" (Hopper's architecture-specific features, which torch adds for sm_90) runs on sm_90
    built = {a.rstrip("af") for a in info["cuda_archs"]}
    assert cap in built, f"GPU {i} is sm_{cap}, the kernels were built for {info['cuda_archs']}"
for op in ("two_point_stats", "two_point_stats_backward", "stats_loss", "stats_loss_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pymks_vae::{op}", "CUDA"), f"no CUDA kernel for {op}"
PY
then
  cat "$OUT/build_info.log" >&2
  finish
fi

# With pytest-xdist (the lent machines have it) a test that kills its process is reported as failed and
# its worker replaced, so one crash cannot hide the rest of the run.
XDIST=()
"$PY" -c "import xdist" 2> /dev/null && XDIST=(-n 4)
step cuda_tests 240 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${XDIST[@]}" -m cuda --junitxml="$OUT/cuda_tests.xml" tests
# The CPU transforms through MKL's DFTI (found at run time in this machine's libtorch_cpu) on its CPU.
step mkl_dft_tests 60 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/mkl_dft_tests.xml" \
  tests/test_mkl_dft.py
# The operators' CPU tests on this machine's (older) torch: schemas, opcheck, torch.compile.
step op_cpu_tests 90 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${XDIST[@]}" -m "not cuda" --junitxml="$OUT/op_cpu_tests.xml" \
  tests/test_extension.py tests/test_two_point.py tests/test_loss.py
step bench_two_point 75 "$PY" benchmarks/bench_two_point.py --device cuda --json "$OUT/bench_two_point.json"
step bench_loss 45 "$PY" benchmarks/bench_loss.py --device cuda --json "$OUT/bench_loss.json"
# Training images/s of a full step (encoder, decoder, loss, backward, Adam): spatial-statistics vs vanilla vs torch.fft.
step bench_training 60 "$PY" benchmarks/bench_training.py --device cuda --json "$OUT/bench_training.json"
# Out-of-bounds accesses of the kernels, on the CUDA tests that compare with the CPU (with strided input too); torch's caching allocator is off, or an
# access past a tensor's end would land in another block of its pool unseen.
SAN="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
command -v compute-sanitizer > /dev/null && SAN=compute-sanitizer
if [ "${SANITIZER:-1}" != 0 ] && [ -x "$(command -v "$SAN")" ]; then
  step sanitizer 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -q -x -p no:cacheprovider --junitxml="$OUT/sanitizer.xml" \
    -m cuda tests/test_two_point.py tests/test_loss.py tests/test_fused_paths.py \
    -k "cuda_matches_cpu or cuda_operator_backward_matches_cpu or (strided_input and not gradcheck)"
else
  printf 'sanitizer\tskipped\t0\t%s\n' "$([ "${SANITIZER:-1}" = 0 ] && echo SANITIZER=0 || echo "compute-sanitizer not found")" \
    >> "$OUT/steps.tsv"
fi
finish
