#!/usr/bin/env bash
# Builds the libFuzzer harnesses (fuzz/, clang + ASan + UBSan) and runs each for a bounded time on its
# checked-in seed corpus. Fails (exit 1) if any fuzzer crashes, hits a sanitizer report, leaks, times
# out on one input or exceeds the memory limit.
#
#   scripts/fuzz.sh [seconds-per-fuzzer] [fuzzer ...]      (default: 60 s, all six)
#
# Environment: QMOE_FUZZ_SKIP_KNOWN=1 (harnesses skip inputs that only re-hit an open finding of
# fuzz/FINDINGS.md; for long runs, never in CI), QMOE_FUZZ_NO_BUILD=1 (use the binaries as they are), QMOE_FUZZ_PARALLEL (fuzzers at once, default 1), QMOE_FUZZ_JOBS (build jobs, default 2),
# QMOE_FUZZ_NICE (default 19), QMOE_FUZZ_BUILD (build dir, default build-fuzz), QMOE_FUZZ_ARGS (extra
# libFuzzer flags).
#
# The checked-in corpus fuzz/corpus/<name>/ is only read; inputs libFuzzer finds go to
# $BUILD/corpus/<name>/ (kept between runs, so coverage accumulates), crash reproducers to
# $BUILD/artifacts/<name>/. Every run appends one line to $BUILD/fuzz-stats.tsv:
#   date  fuzzer  seconds-run  executions  cov  ft  corpus-size  result
# which is where docs/RELIABILITY.md's totals come from.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
[ $# -gt 0 ] && shift
all=(npy onnx safetensors safetensors_index packed_file spec)
if [ $# -gt 0 ]; then fuzzers=("$@"); else fuzzers=("${all[@]}"); fi
build=${QMOE_FUZZ_BUILD:-build-fuzz}
jobs=${QMOE_FUZZ_JOBS:-2}
par=${QMOE_FUZZ_PARALLEL:-1}
nicev=${QMOE_FUZZ_NICE:-19}

targets=()
for f in "${fuzzers[@]}"; do targets+=("fuzz_$f"); done
if [ "${QMOE_FUZZ_NO_BUILD:-0}" != 1 ]; then
  mkdir -p "$build"
  # One build at a time in $build (several fuzz.sh may run side by side).
  exec 9>"$build/.fuzz-build.lock"
  flock 9
  if [ ! -f "$build/build.ninja" ]; then
    cmake -S fuzz -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang >/dev/null
  fi
  nice -n "$nicev" ninja -C "$build" -j "$jobs" "${targets[@]}" >/dev/null || {
    echo "fuzz.sh: build failed; rerun: ninja -C $build ${targets[*]}" >&2
    exit 1
  }
  flock -u 9
fi

mkdir -p "$build/logs"
stats="$build/fuzz-stats.tsv"

run_one() {
  local f=$1
  # One log per run (several runs of one fuzzer may overlap: a long run and a CI run).
  local work="$build/corpus/$f" art="$build/artifacts/$f/" log
  log="$build/logs/$f-$(date -u +%Y%m%dT%H%M%S)-$$-$RANDOM.log"
  mkdir -p "$work" "$art"
  local dict=()
  [ -f "fuzz/$f.dict" ] && dict=(-dict="fuzz/$f.dict")
  local rc=0 t0
  t0=$(date +%s)
  # (grep finds nothing after a crash: the '|| true's below keep set -e from ending the run silently.)
  # -rss_limit_mb / -malloc_limit_mb: inputs are a few KB, so any allocation of hundreds of MB is a
  # header that was believed; libFuzzer reports it as a crash (out-of-memory (malloc(N))).
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  nice -n "$nicev" "$build/fuzz_$f" -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 \
      -malloc_limit_mb=512 -print_final_stats=1 -artifact_prefix="$art" "${dict[@]}" \
      ${QMOE_FUZZ_ARGS:-} "$work" "fuzz/corpus/$f" >"$log" 2>&1 || rc=$?
  local execs cov ft corp took
  took=$(( $(date +%s) - t0 ))
  execs=$(grep -aoE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1) || true
  cov=$(grep -aoE ' cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+') || true
  ft=$(grep -aoE ' ft: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+') || true
  corp=$(grep -aoE ' corp: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+') || true
  local result=ok
  [ "$rc" -ne 0 ] && result="FAIL(rc=$rc)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$f" "$took" "${execs:-?}" "${cov:-?}" \
    "${ft:-?}" "${corp:-?}" "$result" >>"$stats"
  printf 'fuzz_%-18s %5ss  execs %-9s cov %-6s ft %-6s %s\n' "$f" "$took" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$result"
  if [ "$rc" -ne 0 ]; then
    echo "---- fuzz_$f failed; last lines of $log (reproducer in $art):" >&2
    grep -aE 'ERROR|FINDING|SUMMARY|Test unit written|==[0-9]+==|#[0-9]+ 0x' "$log" | head -40 >&2 || true
    return 1
  fi
}

fail=0
pids=()
for f in "${fuzzers[@]}"; do
  run_one "$f" &
  pids+=($!)
  if [ "${#pids[@]}" -ge "$par" ]; then
    wait "${pids[0]}" || fail=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ "$fail" -eq 0 ] && echo "fuzz.sh: all fuzzers ran ${secs}s without a finding" || echo "fuzz.sh: FAILED (see above)" >&2
exit "$fail"
