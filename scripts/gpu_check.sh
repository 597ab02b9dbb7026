#!/usr/bin/env bash
# The GPU check: on a machine with a GPU, torch already installed and no
# network, build torch_ext from source, run the CUDA tests (pytest and
# Catch2, then under compute-sanitizer where it exists), the GPU benchmark
# and a short CUDA training with --amp. Logs and results go to OUTDIR.
# Budget: under 8 minutes on one H200.
#
#   scripts/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record the exit code
  local name=$1 limit=$2; shift 2
  echo "=== $name" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "    rc=$rc  $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$OUT/torch.txt"
# Only the visible GPU's architecture: the fastest build.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}
export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}

step build 300 $PY setup.py build_ext --inplace || { echo "build failed"; exit 1; }
step import 60 $PY -c "import torch_ext; assert torch_ext.built_with_cuda(); print('CUDA kernels registered')"
step pytest_cuda 240 $PY -m pytest -q -ra tests/test_cuda.py tests/test_linear_mid_tread_half_quantize.py \
  tests/test_properties.py --junitxml="$OUT/pytest_cuda.xml" -p no:cacheprovider
step pytest_cuda_models 180 $PY -m pytest -q -ra tests/test_train.py tests/test_weight_quantization.py \
  tests/test_export.py tests/test_codes.py -k cuda --junitxml="$OUT/pytest_cuda_models.xml" -p no:cacheprovider
if [ -e /usr/include/catch2/catch.hpp ] || [ -e /usr/include/catch2/catch_test_macros.hpp ]; then
  step catch2_build 240 bash -c "cmake -S . -B build-gpu -DCMAKE_PREFIX_PATH=\$($PY -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') -DTORCH_EXT_CUDA=ON && cmake --build build-gpu -j $MAX_JOBS"
  step ctest 120 ctest --test-dir build-gpu --output-on-failure
  if command -v compute-sanitizer >/dev/null; then
    step memcheck 180 compute-sanitizer --tool memcheck --error-exitcode 1 build-gpu/tests/cpp/test_torch_ext_cuda
    step racecheck 180 compute-sanitizer --tool racecheck --error-exitcode 1 build-gpu/tests/cpp/test_torch_ext_cuda
  fi
else
  echo "Catch2 not installed: Catch2 CUDA tests not built" | tee -a "$OUT/summary.txt"
fi
step bench 240 $PY -m torch_ext.bench --devices cuda --json "$OUT/bench_gpu.json"
step train_amp 180 $PY -m torch_ext.train --model lmnet_v1_quantize --epochs 3 --device cuda --amp bf16 \
  --no-progress --out "$OUT/train_cuda_amp"
echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED)" | tee -a "$OUT/summary.txt"
exit $status
