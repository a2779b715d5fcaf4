#!/usr/bin/env bash
# One short device call with PREBUILT binaries (built on the dev machine, carried in build-cuda2/dev):
#   qmoe_cuda_tests, qmoe_cuda_bench (the working tree) and qmoe_cuda_bench_base (the baseline commit's
#   CUDA objects linked into the same library), so before/after come from the same card and session.
# Runs: the full GPU tests with compute-sanitizer memcheck and racecheck on --quick alongside, then the
# benchmark A/B (baseline first, then the new build; BASE2=1 runs the baseline again for the spread).
# Usage (repository root, on the GPU machine): bench/cuda_device_ab.sh [bench args...]
# Logs go to $OUT (or /tmp/qmoe-out).
set -uo pipefail
OUT=${OUT:-/tmp/qmoe-out}
mkdir -p "$OUT"
D=${QMOE_DEV_BIN:-build-cuda2/dev}
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
for b in qmoe_cuda_tests qmoe_cuda_bench qmoe_cuda_bench_base; do
  [ -x "$D/$b" ] || { echo "missing $D/$b"; exit 2; }
  if ldd "$D/$b" | grep -q "not found"; then ldd "$D/$b"; echo "unresolved libraries"; exit 2; fi
done
SECONDS=0
timeout ${TEST_TIMEOUT:-150} "$D/qmoe_cuda_tests" > "$OUT/tests.log" 2>&1 & p0=$!
timeout ${TEST_TIMEOUT:-150} compute-sanitizer --tool memcheck --leak-check full "$D/qmoe_cuda_tests" --quick > "$OUT/memcheck.log" 2>&1 & p1=$!
timeout ${TEST_TIMEOUT:-150} compute-sanitizer --tool racecheck "$D/qmoe_cuda_tests" --quick > "$OUT/racecheck.log" 2>&1 & p2=$!
wait $p0; echo "tests rc=$?"; wait $p1; echo "memcheck rc=$?"; wait $p2; echo "racecheck rc=$?"
echo "tests+sanitizers: ${SECONDS}s"
grep -E "FAIL|passed|mismatch" "$OUT/tests.log" | head -20
for t in memcheck racecheck; do echo "== $t"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|FAIL" "$OUT/$t.log" | head -5; done
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--shapes mixtral,qwen3-30b-a3b,gpt-oss-20b --quants int4b128,int8 --tokens 1,8,64 --iters 30)
for v in base new ${BASE2:+base2}; do
  b=qmoe_cuda_bench; [ $v = new ] || b=qmoe_cuda_bench_base
  SECONDS=0
  timeout ${BENCH_TIMEOUT:-80} "$D/$b" "${ARGS[@]}" > "$OUT/bench_$v.log" 2>&1; echo "bench $v rc=$? ${SECONDS}s"
done
for v in base new ${BASE2:+base2}; do echo "== $v"; grep -v "^#" "$OUT/bench_$v.log" | cut -c1-100; done
