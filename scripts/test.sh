#!/usr/bin/env bash
# Sets up and runs every test qmoe has on a machine without a GPU:
#   1. Release build + C++ unit tests (ctest)
#   2. the same C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   3. the CUDA code compiled (not run) when nvcc is present
#   4. the C++ package installed and a consumer project built against it (find_package(qmoe))
#   5. fuzzers (short runs on their corpora) and reliability tests, clang + ASan + UBSan
#   6. the Python module installed, then the pytest suites (ORT agreement, CLI, Python API, export)
# GPU tests run on a GPU machine: see docs/TESTING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "setup"
scripts/setup.sh

step "build (Release)"
scripts/build.sh
step "C++ tests"
ctest --test-dir build --output-on-failure -j "$jobs"

step "C++ tests under ASan + UBSan"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQMOE_SANITIZE=ON -DQMOE_BUILD_BENCH=OFF >/dev/null
ninja -C build-asan qmoe_tests qmoe
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 build-asan/tests/cpp/qmoe_tests --gtest_brief=1

if command -v nvcc >/dev/null 2>&1; then
  step "CUDA code compiles (sm_80, sm_90a; not run: no GPU here)"
  cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DQMOE_BUILD_TESTS=ON >/dev/null
  ninja -C build-cuda
  # Expert parallelism over NCCL (the toolkit ships NCCL here): its test program and benchmark must
  # have been built too, i.e. ep.cmake found NCCL (docs/MULTIGPU.md).
  test -x build-cuda/src/cuda/qmoe_ep_tests && test -x build-cuda/src/cuda/qmoe_ep_bench ||
    { echo "expert parallelism was not built: NCCL not found (see 'qmoe: NCCL' in the cmake output)"; exit 1; }
fi

step "C++ package: install, then build a consumer with find_package(qmoe)"
rm -rf build/install build/consumer
cmake --install build --prefix build/install --component dev >/dev/null
cmake -S tests/consumer -B build/consumer -G Ninja -DCMAKE_PREFIX_PATH="$PWD/build/install" >/dev/null
ninja -C build/consumer >/dev/null
build/consumer/consumer

step "fuzzers and reliability tests (clang, ASan + UBSan)"
scripts/reliability.sh "${QMOE_FUZZ_SECONDS:-30}"

step "Python module"
python3 -m pip install -q --disable-pip-version-check --no-build-isolation .

step "Python tests"
QMOE_BIN="$PWD/build/tools/qmoe/qmoe" python3 -m pytest -q tests/python
