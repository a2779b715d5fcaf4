#!/usr/bin/env bash
# A/B of kernel variants in one device call, so every variant is timed on the same card in the same
# session. Builds, in parallel, the working tree ("new") and copies of it with some files replaced
# ("base", optionally "mid"); runs the GPU tests on "new" (both kernel families) with compute-sanitizer
# memcheck, racecheck and synccheck on the quick subset; then the benchmark on base, mid and new.
#
# Usage (repository root, on the GPU machine; carry build-devdeps):
#   AB_FILES="src/cuda/fc_sm90.cu" AB_BASE=ab/base [AB_MID=ab/mid] bench/cuda_device_ab.sh [bench args...]
# AB_BASE and AB_MID are folders holding the replaced files at their repository paths, made on the dev
# machine before the call, e.g.
#   mkdir -p ab/base/src/cuda && git show HEAD:src/cuda/fc_sm90.cu > ab/base/src/cuda/fc_sm90.cu
# (untracked, so they travel with the working tree). Without AB_FILES only "new" is built.
# Environment: AB_TESTS=0 skips the tests; AB_SAN_ARGS goes to the sanitizer runs (e.g. "--gemm sm90");
# AB_ENVS adds runs of the new build under environment variables, e.g. "QMOE_CUDA_PDL=0"; AB_CMAKE
# adds CMake options to every build, e.g. "-DQMOE_CUDA_TIMELINE=ON" (per-kernel timelines, timeline.h).
# Logs go to $OUT (or /tmp/qmoe-out).
set -uo pipefail
OUT=${OUT:-/tmp/qmoe-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
# The GPU image has no libonnx-dev; the onnx Python package ships the same onnx.proto.
cfg=(-DQMOE_ONNX_PROTO="$(python3 -c 'import onnx,os;print(os.path.join(os.path.dirname(onnx.__file__),"onnx.proto"))')"
     -DCMAKE_PREFIX_PATH="$PWD/build-devdeps" -DQMOE_CUDA=ON -DQMOE_BUILD_TESTS=OFF -DQMOE_BUILD_BENCH=OFF
     -DQMOE_CUDA_GENCODE="${QMOE_CUDA_GENCODE:--gencode=arch=compute_90a,code=sm_90a}" ${AB_CMAKE:-})
build() {  # folder
  local log
  log="$OUT/build_$(basename "$1").log"
  cmake -S "$1" -B "$1/b" -G Ninja "${cfg[@]}" > "$log" 2>&1 &&
    ninja -C "$1/b" qmoe_cuda_bench qmoe_cuda_tests >> "$log" 2>&1 || { echo "build $1: FAIL"; grep error "$log" | head; }
}
SECONDS=0
W=/tmp/qmoe-ab
rm -rf "$W" && mkdir -p "$W/new"
tar --exclude='./build*' --exclude=./.git -cf - . | tar -xf - -C "$W/new"
variants=()
for v in base mid; do
  src=$([ $v = base ] && echo "${AB_BASE:-}" || echo "${AB_MID:-}")
  [ -n "${AB_FILES:-}" ] && [ -n "$src" ] || continue
  cp -r "$W/new" "$W/$v"
  for f in $AB_FILES; do cp "$src/$f" "$W/$v/$f" || exit 2; done
  variants+=("$v")
  build "$W/$v" &
done
build "$W/new"
wait
echo "builds: ${SECONDS}s"

N=$W/new/b/src/cuda
if [ "${AB_TESTS:-1}" != 0 ]; then
  pids=()
  timeout 300 "$N/qmoe_cuda_tests" > "$OUT/tests.log" 2>&1 & pids+=($!)
  timeout 300 "$N/qmoe_cuda_tests" --gemm sm90 > "$OUT/tests_sm90.log" 2>&1 & pids+=($!)
  for tool in memcheck racecheck synccheck; do
    timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 "$N/qmoe_cuda_tests" --quick ${AB_SAN_ARGS:-} \
      > "$OUT/$tool.log" 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; echo "rc=$?"; done
  for f in tests tests_sm90 memcheck racecheck synccheck; do
    echo "== $f"; grep -E "^FAIL|passed|SUMMARY" "$OUT/$f.log" | tail -3
  done
fi
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--shapes mixtral,qwen3-30b-a3b,gpt-oss-20b --quants int4b128,int8 --tokens 1,8,64 --iters 30)
logs=()
run() {  # name, command... (each run's whole log stays in $OUT/bench_<name>.log)
  local log="$OUT/bench_${1// /_}.log"
  shift
  "$@" > "$log" 2>&1; logs+=("$log")
  echo "$(basename "$log"): $(grep -m1 "read bandwidth" "$log")"
}
for v in "${variants[@]}"; do run "$v" "$W/$v/b/src/cuda/qmoe_cuda_bench" "${ARGS[@]}"; done
run new "$N/qmoe_cuda_bench" "${ARGS[@]}"
for e in ${AB_ENVS:-}; do run "new $e" env "$e" "$N/qmoe_cuda_bench" "${ARGS[@]}"; done
"$(dirname "$0")/ab_compare.sh" "${logs[@]}"  # graph us side by side
if [ "${AB_TESTS:-1}" != 0 ]; then  # again at the end, where a tail of the output keeps it
  for f in tests tests_sm90 memcheck racecheck synccheck; do
    echo "$f: $(grep -E "configurations passed|SUMMARY" "$OUT/$f.log" | tr '\n' ' ')"
  done
fi
echo "total: ${SECONDS}s"
