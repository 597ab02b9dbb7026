#!/usr/bin/env bash
# The GPU check: on a machine with one GPU, torch, pytest and the CUDA toolkit
# installed and no network, build torch_ext for the visible GPU and run what
# only a GPU can run, most important first. Planned for the device tool's
# limits: one command may run 600 s and a session has 15 minutes of device
# time, machine start-up included; so the whole check is under 8 minutes,
# each step is killed at its budget, and any step can be run again alone.
#
#   scripts/gpu_check.sh OUTDIR [STEP...]  run preflight, then STEPs (default: every
#                                          default step below, in this order)
#   scripts/gpu_check.sh --find-cuda       print the CUDA toolkit it would use, and why
#   scripts/gpu_check.sh --find-cxx        print the C++ compiler it would build with (CXX=, CC=), and why
#   scripts/gpu_check.sh --list            print the steps and their budgets
#
# Budgets: each step's kill limit in seconds (the script reads them from the
# lines below; GPU_CHECK_BUDGET_<step>=S overrides one for a rerun). The
# default steps sum to 475 s, under 8 minutes; "expect" is the time the step
# should take on one H200 with 16 cores.
#   step preflight   20 s  expect   8 s: torch sees a GPU, CUDA toolkit found, a C++ compiler that links
#                                        libstdc++ shared (else CXX, CC switched to one), nvidia-smi
#   step build      140 s  expect  70 s: setup.py build_ext --inplace for this GPU's arch only
#   step pytest     135 s  expect 100 s: every CUDA test of tests/ (pytest -m cuda: test_cuda.py, the cases
#                                        of the "cuda" device, CUDA AMP training, an inductor training
#                                        step); JUnit checked: no skip but "needs two GPUs"
#   step memcheck    60 s  expect  30 s: compute-sanitizer memcheck, pytest -m sanitize tests/test_cuda.py
#   step racecheck   40 s  expect  20 s: compute-sanitizer racecheck, the same selection
#   step bench       80 s  expect  60 s: python -m benchmarks.bench --devices cuda (256M, 2 dtypes, contiguous
#                                        and channels_last, with the torch.compile'd composite; AMP
#                                        channels_last train steps of LmnetV1Quantize and of LmResnet with
#                                        QuantActivation vs float twins); python -m benchmarks.bench --learnable
#                                        --devices cuda (PACT, LSQ vs the fixed operator, torch's, relu)
#   step train       30 s  expect  15 s: (not a default step: the pytest step trains with AMP on CUDA)
#                                        python -m torch_ext.train --device cuda --amp bf16 --epochs 1
#   step catch2     240 s  expect 150 s: (not a default step) Catch2 CUDA tests, plain and under memcheck,
#                                        only where Catch2 is installed
#
# OUTDIR (made absolute first) receives, as each step ends: summary.txt (one
# block a step, the verdict last), gpu_check.log (every command's output),
# pytest_cuda.xml, memcheck.xml, racecheck.xml, bench.json,
# bench_learnable.json and, from the train step, train_metrics.json: at most 8
# files, no folders (the device tool brings back at most 8 files).
#
# Exit status: 0 every step passed; 1 a step failed; 2 the check could not
# start (no GPU visible to torch, no CUDA toolkit, bad usage); 3 nothing
# failed but a step could not run here (compute-sanitizer refusing the device).
set -uo pipefail

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SCRIPT")/.." && pwd)
PY=${PYTHON:-python3}
DEFAULT_STEPS=(build pytest memcheck racecheck bench)
ALL_STEPS=(preflight "${DEFAULT_STEPS[@]}" train catch2)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
UNSUPPORTED=75  # a step's exit status when it cannot run on this machine

budget_of() {  # budget_of STEP: seconds, from the header (or GPU_CHECK_BUDGET_STEP)
  local override="GPU_CHECK_BUDGET_$1"
  if [ -n "${!override:-}" ]; then echo "${!override}"; return; fi
  sed -n "s/^#   step $1 \+\([0-9]\+\) s .*/\1/p" "$SCRIPT" | head -n 1
}

# --------------------------------------------------------------------------
# The CUDA toolkit: scripts/cuda_toolkit.py finds it (the same rule as
# setup.py's: $CUDA_HOME, the folder nvcc reports for itself, a wrapper
# script's target, nvcc's real path, /usr/local/cuda), here leniently: a
# CUDA_HOME that is no toolkit is passed over.

find_cuda() {  # prints "DIR<TAB>how it was found" and returns 0, or explains and returns 1
  "$PY" "$ROOT/scripts/cuda_toolkit.py" --how --lenient
}

# --------------------------------------------------------------------------
# The C++ compiler: scripts/cxx_toolchain.py (the rule setup.py enforces).
# One with no shared libstdc++ ($CXX -print-file-name=libstdc++.so names no
# file; a GCC under /opt/gcc set as CXX on a GPU machine) links a static
# libstdc++ into _C.so, which then crashes on its first error message: the
# preflight switches CXX (and CC, nvcc's host compiler) to the first that
# links it shared, of $CXX, /usr/bin/g++, /usr/bin/c++, g++ and c++ on PATH.

find_cxx() {  # prints CXX=, CC= (where it switches), why: and compiler: lines; or explains and returns 1
  "$PY" "$ROOT/scripts/cxx_toolchain.py" --select
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-}/bin/compute-sanitizer" \
      "${CUDA_HOME:-}/compute-sanitizer/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

# --------------------------------------------------------------------------
# The steps. Each runs as its own process (this script with --run-step) under
# `timeout`, its output appended to gpu_check.log; pytest gets a smaller limit
# of its own and SIGINT, so that it stops cleanly and still writes its JUnit
# file, and a hung test fails alone (pytest-timeout, where installed).

pytest_timeout_args() {
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then echo "--timeout=$1"; fi
}

check_built() {
  "$PY" -c "import torch_ext, sys; sys.exit(0 if torch_ext.built_with_cuda() else 1)" 2>/dev/null && return 0
  echo "torch_ext is not built with its CUDA kernels here: run the build step first (scripts/gpu_check.sh OUTDIR build ...)"
  return 1
}

step_build() {
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FORCE_CUDA=1 MAX_JOBS=$MAX_JOBS" \
    "CXX=${CXX:-(unset: c++)} CC=${CC:-(unset)}"
  FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || return 1
  "$PY" - <<'EOF'
import torch, torch_ext
assert torch_ext.built_with_cuda(), "the CUDA kernels are not registered"
x = torch.linspace(-1.0, 3.0, 1001)
y = torch_ext.linear_mid_tread_half_quantize(x.cuda(), 2, 2.0).cpu()
assert torch.equal(y.view(torch.int32), torch_ext.linear_mid_tread_half_quantize(x, 2, 2.0).view(torch.int32)), "CUDA != CPU"
print("built:", torch_ext.__file__, "- CUDA kernels registered, a first CUDA call equals the CPU")
EOF
}

step_pytest() {
  # -m cuda: every test that runs on the GPU (tests/conftest.py marks them).
  # A test module that cannot be imported here is an error in the JUnit file
  # (the step fails) but does not keep the other CUDA tests from running.
  local limit=$(($1 - 15)) rc
  check_built || return 1
  timeout -s INT -k 10 "$limit" "$PY" -m pytest tests -m cuda -v -rs -p no:cacheprovider \
    --continue-on-collection-errors --durations=10 \
    --junitxml="$OUT/pytest_cuda.xml" -o junit_duration_report=call $(pytest_timeout_args 90)
  rc=$?
  [ $rc -eq 124 ] && echo "pytest stopped at its limit of $limit s"
  "$PY" scripts/check_junit.py --min-tests 300 "$OUT/pytest_cuda.xml" || rc=1
  return $rc
}

step_sanitizer() {  # step_sanitizer TOOL BUDGET
  local tool=$1 limit=$(($2 - 12)) sanitizer rc log
  if ! sanitizer=$(find_sanitizer); then
    echo "UNSUPPORTED: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    return $UNSUPPORTED
  fi
  check_built || return 1
  echo "$sanitizer --tool $tool, caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
  log=$(mktemp)
  # --report-api-errors no: torch probes the runtime with calls that fail by
  # design; the device-side findings stay fatal (--error-exitcode).
  # --launch-timeout 0: importing torch may take longer than the default 10 s
  # before the first CUDA call; the step's own timeout bounds the wait.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 10 "$limit" "$sanitizer" --tool "$tool" \
    --error-exitcode 1 --report-api-errors no --launch-timeout 0 \
    "$PY" -m pytest tests/test_cuda.py -m sanitize -v -rs -p no:cacheprovider \
    --junitxml="$OUT/$tool.xml" $(pytest_timeout_args 60) 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if grep -q -i -E "device not supported|not supported on this (device|platform)|unable to (find|load) .*(interceptor|injection)" "$log"; then
    rm -f "$log"
    echo "UNSUPPORTED: compute-sanitizer cannot check this machine's GPU (see its lines above)"
    return $UNSUPPORTED
  fi
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -n 2
  rm -f "$log"
  "$PY" scripts/check_junit.py --min-tests 1 "$OUT/$tool.xml" || rc=1
  return $rc
}

step_bench() {
  check_built || return 1
  "$PY" -m benchmarks.bench --devices cuda --sizes 256M --dtypes float32,bfloat16 --layouts contiguous,channels_last \
    --repeats 10 --warmup 3 --train-repeats 5 --train-amp bfloat16 --train-channels-last \
    --train-models lmnet_v1,lm_resnet \
    --json "$OUT/bench.json" || return 1
  # The benchmark skips CUDA quietly where it sees none: demand CUDA figures.
  "$PY" - "$OUT/bench.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
ok = [r for r in doc["results"] if r["device"] == "cuda" and r["status"] == "ok"]
ours = [r for r in ok if r["candidate"] == "torch_ext"]
compiled = [r for r in ok if r["candidate"] == "composite_compiled"]
train = [t for t in doc["train_step"] if t["device"] == "cuda"]
ratios = ", ".join(f"{t['quantized']}/{t['float']} {t['ratio_quantized_over_float']:.2f}x" for t in train)
print(f"bench.json: {len(ok)} CUDA figures ({len(ours)} of torch_ext, {len(compiled)} of the compiled composite), "
      f"{len(train)} CUDA training step(s) ({ratios}), copy {doc['copy_bandwidth_gbps'].get('cuda', 0):.0f} GB/s")
sys.exit(0 if ours and compiled and {t["model"] for t in train} == {"lmnet_v1", "lm_resnet"} else 1)
EOF
  [ $? -eq 0 ] || return 1
  # The learnable max_value (PACT, LSQ) against the fixed operator, torch's
  # learnable fake-quantize and relu, forward+backward, in the same rounds.
  "$PY" -m benchmarks.bench --learnable --devices cuda --sizes 256M --dtypes float32,bfloat16 --repeats 10 \
    --warmup 3 --json "$OUT/bench_learnable.json" || return 1
}

step_train() {
  local rc
  check_built || return 1
  rm -rf "$WORK/train"
  "$PY" -m torch_ext.train --device cuda --amp bf16 --epochs 1 --no-progress --out "$WORK/train"
  rc=$?
  [ -f "$WORK/train/metrics.json" ] && cp "$WORK/train/metrics.json" "$OUT/train_metrics.json"
  return $rc
}

step_catch2() {
  local build="$WORK/build-catch2" rc
  if [ ! -e /usr/include/catch2/catch.hpp ] && [ ! -e /usr/include/catch2/catch_test_macros.hpp ] \
      && [ ! -e /usr/local/include/catch2/catch_test_macros.hpp ]; then
    echo "UNSUPPORTED: Catch2 is not installed: the Catch2 CUDA tests cannot be built here"
    return $UNSUPPORTED
  fi
  cmake -S . -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
    $("$PY" scripts/cmake_cuda_args.py) -DTORCH_EXT_CUDA=ON || return 1
  cmake --build "$build" -j "$MAX_JOBS" || return 1
  "$build/tests/cpp/test_torch_ext_cuda" || return 1
  local sanitizer
  if sanitizer=$(find_sanitizer); then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 --report-api-errors no --launch-timeout 0 \
      "$build/tests/cpp/test_torch_ext_cuda"
    rc=$?
    return $rc
  fi
  echo "compute-sanitizer not found: the Catch2 CUDA tests ran without it"
}

run_step_body() {  # inside the step's own process
  local name=$1 budget=$2
  cd "$ROOT" || return 1
  case $name in
    build) step_build ;;
    pytest) step_pytest "$budget" ;;
    memcheck) step_sanitizer memcheck "$budget" ;;
    racecheck) step_sanitizer racecheck "$budget" ;;
    bench) step_bench ;;
    train) step_train ;;
    catch2) step_catch2 ;;
    *) echo "unknown step $name"; return 2 ;;
  esac
}

# --------------------------------------------------------------------------

say() { echo "$*" | tee -a "$OUT/summary.txt"; }

preflight() {
  # Fails the whole check, fast, when torch sees no GPU: every CUDA test
  # would skip and pytest would pass without touching a GPU.
  local info rc t0=$SECONDS
  say "=== preflight (budget $(budget_of preflight) s)"
  info=$(timeout $(($(budget_of preflight) - 6)) "$PY" - 2>&1 <<'EOF'
import os, sys
try:
    import torch
except Exception as exc:
    print(f"gpu_check: FAILED: cannot import torch with {sys.executable}: {exc}")
    sys.exit(2)
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
      f"built with CUDA {torch.version.cuda}")
if torch.version.cuda is None:
    print("gpu_check: FAILED: no GPU: this torch is a CPU-only build (torch.version.cuda is None)")
    sys.exit(2)
if not torch.cuda.is_available():
    print("gpu_check: FAILED: no GPU visible to torch (torch.cuda.is_available() is False; "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): "
          "every CUDA test would be skipped, nothing to check")
    sys.exit(2)
major, minor = torch.cuda.get_device_capability(0)
print(f"GPU 0: {torch.cuda.get_device_name(0)}, capability {major}.{minor}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s)")
print(f"ARCH={major}.{minor}")
EOF
)
  rc=$?
  echo "$info" | grep -v '^ARCH=' | tee -a "$OUT/summary.txt" "$LOG"
  if [ $rc -ne 0 ]; then
    [ $rc -eq 124 ] && say "gpu_check: FAILED: python/torch did not answer within $(($(budget_of preflight) - 6)) s"
    say "gpu_check: FAILED (preflight, $((SECONDS - t0)) s)"
    exit 2
  fi
  # Only the visible GPU's architecture: the fastest build.
  TORCH_CUDA_ARCH_LIST=$(echo "$info" | sed -n 's/^ARCH=//p')
  local found
  if ! found=$(find_cuda 2>"$WORK/find_cuda.txt"); then
    tee -a "$OUT/summary.txt" < "$WORK/find_cuda.txt"
    say "gpu_check: FAILED: no CUDA toolkit found (see above)"
    exit 2
  fi
  CUDA_HOME=${found%%$'\t'*}
  PATH="$CUDA_HOME/bin:$PATH"
  MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export TORCH_CUDA_ARCH_LIST CUDA_HOME PATH MAX_JOBS
  say "CUDA toolkit: $CUDA_HOME (${found#*$'\t'}); $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"
  say "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (the visible GPU only), MAX_JOBS=$MAX_JOBS"
  local cxx why cc
  if ! cxx=$(find_cxx 2>"$WORK/find_cxx.txt"); then
    tee -a "$OUT/summary.txt" < "$WORK/find_cxx.txt"
    say "gpu_check: FAILED: no C++ compiler that links libstdc++ shared (see above): set CXX to one whose" \
      "-print-file-name=libstdc++.so names a file (a static libstdc++ in _C.so crashes it)"
    exit 2
  fi
  why=$(sed -n 's/^why: //p' <<< "$cxx")
  if [[ $why == switched* ]]; then
    CXX=$(sed -n 's/^CXX=//p' <<< "$cxx")
    export CXX
    cc=$(sed -n 's/^CC=//p' <<< "$cxx")
    if [ -n "$cc" ]; then CC=$cc; export CC; fi
    say "C++ compiler: CXX=$CXX${cc:+ CC=$cc}, $why"
  fi
  say "C++ compiler: $(sed -n 's/^compiler: //p' <<< "$cxx")"
  say "compute-sanitizer: $(find_sanitizer || echo 'not found')"
  { command -v nvidia-smi >/dev/null && timeout 5 nvidia-smi; } >> "$LOG" 2>&1
  say "    ok  $((SECONDS - t0)) s"
}

run_step() {
  local name=$1 budget rc t0=$SECONDS verdict
  budget=$(budget_of "$name")
  say "=== $name (budget $budget s)"
  echo "===== $name ($(date -u +%H:%M:%S) UTC, budget $budget s)" >> "$LOG"
  timeout -k 10 "$budget" bash "$SCRIPT" --run-step "$name" "$budget" >> "$LOG" 2>&1
  rc=$?
  case $rc in
    0) verdict=ok ;;
    "$UNSUPPORTED") verdict=UNSUPPORTED; unsupported+=("$name") ;;
    124 | 137) verdict="FAILED (killed at its budget of $budget s)"; failed+=("$name") ;;
    *) verdict="FAILED (rc=$rc)"; failed+=("$name") ;;
  esac
  digest "$name" "$rc" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  say "    $verdict  $((SECONDS - t0)) s"
}

digest() {  # digest STEP RC: the lines of the step's log worth reading in summary.txt
  local lines
  lines=$(awk -v head="===== $1 (" 'index($0, head) == 1 { on = 1; next } /^===== / { on = 0 } on' "$LOG")
  {
    # Verdicts and totals: check_junit, pytest's last line, the sanitizer's summary, ...
    grep -E "^check_junit|^=+ .*(passed|failed|error|skipped).* in [0-9.]+s|ERROR SUMMARY|RACECHECK SUMMARY|UNSUPPORTED|^built:|^bench.json:|^bench_learnable:|^test accuracy|stopped at its limit" <<< "$lines" | tail -n 4
    # The first few failures and refused skips.
    grep -E "^  (failed|error|skipped, not allowed|fewer than)" <<< "$lines" | head -n 6
    # A failed step with nothing above: its last lines (an exception, the build's last command).
    if [ "$2" -ne 0 ] && ! grep -q -E "^check_junit|UNSUPPORTED" <<< "$lines"; then
      tail -n 3 <<< "$lines" | cut -c 1-300
    fi
  } | awk '!seen[$0]++' | cut -c 1-300
}

main() {
  case ${1:-} in
    --run-step) shift; run_step_body "$@"; exit $? ;;
    --find-cuda)
      local found
      found=$(find_cuda) || exit 2
      echo "CUDA_HOME=${found%%$'\t'*}"
      echo "found: ${found#*$'\t'}"
      exit 0 ;;
    --find-cxx)
      find_cxx || exit 2
      exit 0 ;;
    --list)
      sed -n 's/^#   step /  /p' "$SCRIPT"
      exit 0 ;;
    "" | -h | --help)
      sed -n '2,/^set -uo/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//'
      [ -n "${1:-}" ] && exit 0
      exit 2 ;;
  esac
  mkdir -p "$1" || exit 2
  OUT=$(cd "$1" && pwd)  # absolute, before any cd
  shift
  local steps=("$@") s
  [ ${#steps[@]} -gt 0 ] || steps=("${DEFAULT_STEPS[@]}")
  for s in "${steps[@]}"; do
    if [ "$s" = preflight ] || [[ ! " ${ALL_STEPS[*]} " =~ " $s " ]]; then
      echo "gpu_check: unknown step '$s' (steps: ${ALL_STEPS[*]:1}; preflight always runs first)" >&2
      exit 2
    fi
  done
  LOG="$OUT/gpu_check.log"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  export OUT LOG WORK PYTHON="$PY"
  cd "$ROOT" || exit 2
  : > "$OUT/summary.txt"
  echo "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S') UTC on $(hostname): steps ${steps[*]}" | tee -a "$OUT/summary.txt" > "$LOG"
  failed=() unsupported=()
  preflight
  for s in "${steps[@]}"; do run_step "$s"; done
  if [ ${#failed[@]} -gt 0 ]; then
    say "gpu_check: FAILED: ${failed[*]}$([ ${#unsupported[@]} -gt 0 ] && echo "; could not run here: ${unsupported[*]}") ($SECONDS s)"
    exit 1
  elif [ ${#unsupported[@]} -gt 0 ]; then
    say "gpu_check: INCOMPLETE: everything that ran passed; could not run here: ${unsupported[*]} ($SECONDS s)"
    exit 3
  fi
  say "gpu_check: PASSED: ${steps[*]} ($SECONDS s)"
}

main "$@"
