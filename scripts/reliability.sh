#!/usr/bin/env bash
# CI job for issue 7: builds the fuzz harnesses and the reliability tests with clang + ASan + UBSan
# (one build, build-fuzz/), runs the reliability tests, then every fuzzer for a short bounded time on
# its checked-in corpus (which includes every reproducer found so far, so past findings are
# regression-tested on each run). Fails on any test failure, crash or sanitizer report.
#
#   scripts/reliability.sh [seconds-per-fuzzer]     (default 30; two fuzzers at a time)
#
# Budget on 2 cores: the first build of build-fuzz is the long part (the library, the generated ONNX
# protobuf code and the fuzzers, all instrumented); after that the run is
# tests (~1 min) + 6 fuzzers x 30 s / 2 in parallel = ~2.5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
build=${QMOE_FUZZ_BUILD:-build-fuzz}
jobs=${QMOE_FUZZ_JOBS:-2}
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "build fuzzers and reliability tests (clang, ASan + UBSan) in $build"
mkdir -p "$build"
if [ ! -f "$build/build.ninja" ]; then
  cmake -S fuzz -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang >/dev/null
fi
flock "$build/.fuzz-build.lock" ninja -C "$build" -j "$jobs" >/dev/null

step "reliability tests under ASan + UBSan (bounded resources, determinism, bad inputs)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$build/reliability_tests" --gtest_brief=1

step "fuzzers, ${secs}s each, two at a time"
QMOE_FUZZ_PARALLEL=2 QMOE_FUZZ_NICE=${QMOE_FUZZ_NICE:-0} scripts/fuzz.sh "$secs"
