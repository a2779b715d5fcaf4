#!/usr/bin/env bash
# One device call: build the CUDA targets, run the GPU tests, compute-sanitizer (memcheck, racecheck,
# initcheck on the --quick subset) in parallel with them, then the benchmark and the PyTorch peers.
# Usage (repository root, on the GPU machine): bench/cuda_device_run.sh [tests] [bench] [peer] [quickbench]
# Logs go to $OUT (or /tmp/qmoe-out).
set -uo pipefail
OUT=${OUT:-/tmp/qmoe-out}
mkdir -p "$OUT"
stages=" ${*:-tests bench peer} "
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
B=build-dev
if [ ! -x $B/src/cuda/qmoe_cuda_bench ] || [ -n "${QMOE_REBUILD:-}" ]; then
  # The GPU image has no libonnx-dev; the onnx Python package ships the same onnx.proto.
  proto=()
  [ -f /usr/include/onnx/onnx.proto ] || proto=(-DQMOE_ONNX_PROTO="$(python3 -c 'import onnx,os;print(os.path.join(os.path.dirname(onnx.__file__),"onnx.proto"))')")
  [ -d build-devdeps ] && proto+=(-DCMAKE_PREFIX_PATH="$PWD/build-devdeps")  # CLI11/nlohmann headers, if carried
  cmake -S . -B $B -G Ninja -DQMOE_CUDA=ON -DQMOE_BUILD_TESTS=OFF -DQMOE_BUILD_BENCH=OFF "${proto[@]}" \
    -DQMOE_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" > "$OUT/build.log" 2>&1
fi
ninja -C $B qmoe_cuda_tests qmoe_cuda_bench >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build ok"
T=$B/src/cuda/qmoe_cuda_tests
if [[ $stages == *" tests "* ]]; then
  timeout 300 $T > "$OUT/tests.log" 2>&1 & p0=$!
  timeout 300 compute-sanitizer --tool memcheck --leak-check full $T --quick > "$OUT/memcheck.log" 2>&1 & p1=$!
  timeout 300 compute-sanitizer --tool racecheck $T --quick > "$OUT/racecheck.log" 2>&1 & p2=$!
  timeout 300 compute-sanitizer --tool initcheck $T --quick > "$OUT/initcheck.log" 2>&1 & p3=$!
  wait $p0; echo "tests rc=$?"; wait $p1; echo "memcheck rc=$?"; wait $p2; echo "racecheck rc=$?"; wait $p3; echo "initcheck rc=$?"
  grep -E "FAIL|passed" "$OUT/tests.log" | head -20
  for t in memcheck racecheck initcheck; do echo "== $t"; grep -E "ERROR SUMMARY|passed|FAIL|Error" "$OUT/$t.log" | head -5; done
fi
if [[ $stages == *" sm90tests "* ]]; then
  # The suite with the wgmma kernels forced on (and the default dispatch), sanitizers on the quick subset.
  timeout 400 $T --gemm sm90 > "$OUT/tests_sm90.log" 2>&1 & p0=$!
  timeout 400 $T > "$OUT/tests.log" 2>&1 & p4=$!
  timeout 400 compute-sanitizer --tool memcheck --error-exitcode 9 $T --gemm sm90 --quick > "$OUT/memcheck.log" 2>&1 & p1=$!
  timeout 400 compute-sanitizer --tool racecheck --error-exitcode 9 $T --gemm sm90 --quick > "$OUT/racecheck.log" 2>&1 & p2=$!
  timeout 400 compute-sanitizer --tool initcheck --error-exitcode 9 $T --gemm sm90 --quick > "$OUT/initcheck.log" 2>&1 & p3=$!
  wait $p0; echo "tests --gemm sm90 rc=$?"; wait $p4; echo "tests rc=$?"
  wait $p1; echo "memcheck rc=$?"; wait $p2; echo "racecheck rc=$?"; wait $p3; echo "initcheck rc=$?"
  grep -E "FAIL|passed|workspace" "$OUT/tests_sm90.log" | head -20
  grep -E "FAIL|passed|workspace" "$OUT/tests.log" | head -20
  for t in memcheck racecheck initcheck; do echo "== $t"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|FAIL|Error|Race reported" "$OUT/$t.log" | head -8; done
fi
if [[ $stages == *" prefill "* ]]; then
  # Prefill: the SM80-family and the wgmma kernels on the same card, then the bf16 peer.
  for g in ${PREFILL_GEMMS:-sm80 sm90}; do
    tl=${PREFILL_T:-512,2048,8192}
    [ $g = sm80 ] && tl=${PREFILL_T_SM80:-$tl}
    timeout 280 $B/src/cuda/qmoe_cuda_bench --gemm $g --tokens $tl --iters ${PREFILL_ITERS:-10} \
      --quants ${PREFILL_Q:-int4b128} > "$OUT/prefill_$g.log" 2>&1; echo "prefill $g rc=$?"
    grep -vE "^#|^$" "$OUT/prefill_$g.log" | head -60
  done
  PYTHONUNBUFFERED=1 timeout 150 python3 bench/cuda_bench.py --tokens ${PREFILL_T:-512,2048,8192} --iters 10 \
    > "$OUT/peer.log" 2>&1; echo "peer rc=$?"
  cat "$OUT/peer.log"
fi
if [[ $stages == *" ncu90 "* ]]; then
  # Where the wgmma kernels' time goes (fc1 and fc2 of one run): speed of light, tensor pipe, SM clock,
  # issue slots, and the warp stall reasons. NCU90_CASES: shape:T pairs; NCU90_QUANT (default int4b128).
  st=smsp__warp_issue_stalled
  M=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed
  M=$M,dram__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed
  # (sm__pipe_tensor_op_gmma_cycles_active reads n/a on H100 with this ncu; sm__pipe_tensor_cycles_active counts wgmma)
  M=$M,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed,sm__cycles_elapsed.avg.per_second
  M=$M,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_uniform.avg.pct_of_peak_sustained_active
  for r in long_scoreboard short_scoreboard wait barrier math_pipe_throttle mio_throttle lg_throttle selected not_selected \
           no_instruction dispatch_stall membar sleeping branch_resolving misc drain tex_throttle imc_miss; do
    M=$M,${st}_${r}_per_warp_active.pct
  done
  for c in ${NCU90_CASES:-"mixtral:2048"}; do
    set -- ${c/:/ }
    timeout 200 ncu --clock-control none --metrics $M -k regex:fc_sm90_kernel --launch-count 2 \
      $B/src/cuda/qmoe_cuda_bench --gemm sm90 --shapes $1 --quants ${NCU90_QUANT:-int4b128} --tokens $2 --iters 1 \
      > "$OUT/ncu90_$1.log" 2>&1; echo "ncu90 $1 T=$2 rc=$?"
    grep -E "fc_sm90_kernel|gpu__time|throughput|pct|per_second|ERROR|rror" "$OUT/ncu90_$1.log" | grep -v -E " 0(\.0+)?$" |
      sed -E 's/\(anonymous namespace\):://g; s/qmoe::cuda:://g; s/smsp__warp_issue_stalled_//; s/_per_warp_active.pct//' |
      cut -c1-120 | head -60
  done
fi
if [[ $stages == *" memcheck1 "* ]]; then
  timeout 120 compute-sanitizer --tool memcheck --show-backtrace device $T --only 0 > "$OUT/memcheck.log" 2>&1; echo "memcheck1 rc=$?"
  grep -v "^=========     Host Frame" "$OUT/memcheck.log" | head -30
fi
if [[ $stages == *" testsonly "* ]]; then
  timeout 300 $T > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
  grep -E "FAIL|passed" "$OUT/tests.log" | head -20
fi
if [[ $stages == *" quickbench "* ]]; then
  timeout 300 $B/src/cuda/qmoe_cuda_bench ${BENCH_ARGS:---quick} > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
  cat "$OUT/bench.log"
fi
if [[ $stages == *" ncu "* ]]; then
  # Per-kernel durations and DRAM throughput of one decode and one small-batch case.
  st=smsp__warp_issue_stalled
  M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size
  M=$M,${st}_no_instruction_per_warp_active.pct,${st}_long_scoreboard_per_warp_active.pct,${st}_short_scoreboard_per_warp_active.pct
  M=$M,${st}_wait_per_warp_active.pct,${st}_math_pipe_throttle_per_warp_active.pct,${st}_lg_throttle_per_warp_active.pct
  M=$M,${st}_mio_throttle_per_warp_active.pct,${st}_barrier_per_warp_active.pct,${st}_selected_per_warp_active.pct,${st}_not_selected_per_warp_active.pct
  M=$M,${st}_imc_miss_per_warp_active.pct,${st}_branch_resolving_per_warp_active.pct,${st}_dispatch_stall_per_warp_active.pct
  for c in ${NCU_CASES:-"qwen3-30b-a3b:1" "mixtral:1" "mixtral:64" "gpt-oss-20b:1"}; do
    set -- ${c/:/ }
    timeout 120 ncu --clock-control none --metrics $M \
      -k regex:"fc_kernel|route_kernel|group_kernel|combine_kernel|convert_kernel" --launch-skip 20 --launch-count 5 \
      $B/src/cuda/qmoe_cuda_bench --shapes $1 --quants int4b128 --tokens $2 --iters 3 > "$OUT/ncu_one.log" 2>&1
    echo "== ncu $1 T=$2" | tee -a "$OUT/ncu.log"
    cat "$OUT/ncu_one.log" >> "$OUT/ncu.log"
    grep -E "fc_kernel|gpu__time|dram__|warps_active|stalled" "$OUT/ncu_one.log" | grep -v -E " 0(\.0+)?$" | sed -E 's/\(anonymous namespace\):://g; s/qmoe::cuda:://g; s/smsp__warp_issue_stalled_//; s/_per_warp_active.pct//' | cut -c1-110 | head -40
  done
  rm -f "$OUT/ncu_one.log"
  obj=$(find $B -name 'cuda_kernels.cu.o' | head -1)
  cuobjdump -sass "$obj" 2>/dev/null | awk '/Function : .*fc_kernelI13__nv_bfloat16Li4ELi1ELb1/{p=1} p&&/Function : /&&!/Li4ELi1ELb1/{p=0} p' > "$OUT/sass_fc1_bf16_w4_nt1.txt"
  echo "sass lines: $(wc -l < "$OUT/sass_fc1_bf16_w4_nt1.txt")"
fi
if [[ $stages == *" bench "* ]]; then
  timeout 400 $B/src/cuda/qmoe_cuda_bench > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
  cat "$OUT/bench.log"
fi
if [[ $stages == *" peer "* ]]; then
  PYTHONUNBUFFERED=1 timeout 500 python3 bench/cuda_bench.py ${PEER_ARGS:-} > "$OUT/peer.log" 2>&1; echo "peer rc=$?"
  cat "$OUT/peer.log"
fi
