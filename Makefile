# The two commands of the README:
#   make train   train the W1A2 LMNet on digits next to its float twin
#   make test    build everything and run every test (pytest; ctest, built under ASan/UBSan)
# and the loop for an edit:
#   make check   rebuild what changed, then the tests not marked slow (pytest -m "not slow")
# Both create .venv when it is missing and install what they need into it.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine's disk holds torch 2.14.1 (a CUDA 13.0 build) and 2.13.0 (CPU).
TORCH_VERSION ?= 2.14.1
CMAKE_BUILD_DIR ?= build-cmake
PYTEST_ARGS ?=

# The CUDA toolkit: setup.py and scripts/cmake_cuda_args.py find it
# (scripts/cuda_toolkit.py); set CUDA_HOME to choose another.
# The GPU architectures this checkout's builds compile for: TORCH_CUDA_ARCH_LIST from
# the environment if set; else the visible GPUs' (nvidia-smi); else 9.0, the H200's,
# the machine code scripts/kernel_report.py reads. Each architecture is a full device
# compile of every kernel, so a build for this machine is several times quicker. A
# wheel built with `pip install .` outside make keeps setup.py's DEFAULT_CUDA_ARCH_LIST.
ifeq ($(origin TORCH_CUDA_ARCH_LIST),undefined)
TORCH_CUDA_ARCH_LIST := $(or $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
	| grep -E '^[0-9]+\.[0-9]+$$' | sort -u | paste -sd';'),9.0)
endif
export TORCH_CUDA_ARCH_LIST
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS
# pytest's processes (pytest-xdist): a process a core, at most 8 (each imports torch).
PYTEST_JOBS ?= $(shell n=$$(nproc); echo $$(( n < 8 ? n : 8 )))
PYTEST_XDIST = -n $(PYTEST_JOBS)

SOURCES := $(shell find csrc cuda -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps build build-cpp catch2 test test-python test-cpp check train bench sanitize clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(PY) requirements-dev.txt $(wildcard requirements/*.txt)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install "torch==$(TORCH_VERSION)" -r requirements-dev.txt
	touch $@

deps: $(DEPS_STAMP)

# The Python extension torch_ext._C, installed editable into .venv.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | grep -E "\[[0-9]+/[0-9]+\]|error|Error|warning: |Successfully" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "import torch_ext; print('torch_ext built, CUDA kernels:', torch_ext.built_with_cuda())"
	touch $@

build: $(BUILD_STAMP)

# Catch2 from Debian's package when no Catch2 is installed.
catch2:
	@if [ ! -e /usr/include/catch2/catch.hpp ] && [ ! -e /usr/include/catch2/catch_test_macros.hpp ] \
	    && [ ! -e /usr/local/include/catch2/catch_test_macros.hpp ]; then \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q catch2; fi

# cmake options that find LibTorch (and, on a pip-installed CUDA torch, nvrtc) in .venv.
CMAKE_ARGS = -G Ninja -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	-DCMAKE_MAKE_PROGRAM="$(abspath $(VENV))/bin/ninja" \
	$$($(PY) scripts/cmake_cuda_args.py)

# One LibTorch build, under AddressSanitizer and UBSan: the library (CPU and CUDA
# kernels), its Catch2 tests and the examples. The Python build compiles the same
# sources optimised, and pytest runs them; a second, unsanitised CMake build would
# only run the same ctest cases again. The device code is not instrumented.
build-cpp: $(DEPS_STAMP) catch2
	$(VENV)/bin/cmake -S . -B $(CMAKE_BUILD_DIR) $(CMAKE_ARGS) -DTORCH_EXT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	$(VENV)/bin/cmake --build $(CMAKE_BUILD_DIR) -j $(MAX_JOBS)

# pytest-xdist: the tests in $(PYTEST_JOBS) processes (each test is independent; ids are the same in each).
test-python: $(BUILD_STAMP)
	$(PY) -m pytest tests -ra $(PYTEST_XDIST) --durations=15 $(PYTEST_ARGS)

# ctest runs the tests in parallel (-j): the Catch2 cases and the examples are independent,
# but the deployed-model example's fixture (the Python that writes the .pt2) runs first.
# protect_shadow_gap=0: the CUDA driver maps memory where ASan's shadow gap would be.
# The fixtures import torch_ext from the source tree: its _C*.so must be built first.
test-cpp: build-cpp $(BUILD_STAMP)
	ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(VENV)/bin/ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure -j $(MAX_JOBS)

# The short loop for an edit: an incremental build in place (ninja keeps its
# objects in build/, so only what changed compiles; the editable install of
# `make build` loads the same torch_ext/_C*.so), then every test not marked slow
# (a slow test takes 10 s or more), in $(PYTEST_JOBS) processes.
check: $(BUILD_STAMP)
	$(PY) setup.py -q build_ext --inplace 2>&1 | grep -E "error|Error" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m pytest tests -q -m "not slow" $(PYTEST_XDIST) -p no:cacheprovider $(PYTEST_ARGS)

# Every test: pytest, and ctest on the ASan/UBSan build. The two halves are
# independent and run side by side: pytest shows its progress here, the C++ half
# writes to $(CPP_LOG) (tail -f it to follow), printed whole when pytest is done.
CPP_LOG := $(CMAKE_BUILD_DIR)/make-test-cpp.log
# The Python extension is built first: both halves load it.
test: $(BUILD_STAMP) catch2
	@mkdir -p $(CMAKE_BUILD_DIR); rm -f $(CPP_LOG).rc
	@echo "make test-cpp (the LibTorch build under ASan/UBSan, then ctest) runs beside pytest, into $(CPP_LOG)"
	@( $(MAKE) --no-print-directory test-cpp > $(CPP_LOG) 2>&1; echo $$? > $(CPP_LOG).rc ) & \
	$(MAKE) --no-print-directory test-python; py=$$?; wait; cpp=$$(cat $(CPP_LOG).rc); \
	echo "---- make test-cpp ($(CPP_LOG)):"; cat $(CPP_LOG); \
	echo "make test: pytest exit $$py, make test-cpp exit $$cpp"; [ "$$py" = 0 ] && [ "$$cpp" = 0 ]

# Train the W1A2 LMNet and its float twin, then run the trained W1A2 model in
# low bits (torch_ext.deploy): its accuracy, agreement, weight bytes and speed.
train: $(BUILD_STAMP)
	$(PY) -m torch_ext.train --compare
	$(PY) -m torch_ext.deploy runs/compare/lmnet_v1_quantize/checkpoint.pt --out runs/compare/lmnet_v1_quantize/deployed.pt2 \
	  --eval --speed-against runs/compare/lmnet_v1/checkpoint.pt

bench: $(BUILD_STAMP)
	$(PY) -m benchmarks.bench --json bench.json

# The name of the LibTorch tests before they ran only sanitized.
sanitize: test-cpp

clean:
	rm -rf build $(CMAKE_BUILD_DIR) build-sanitize *.egg-info torch_ext/_C*.so $(BUILD_STAMP)
