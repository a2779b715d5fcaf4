#!/usr/bin/env bash
# Expert parallelism on a multi-GPU machine (issue 8, docs/MULTIGPU.md): builds only the EP targets,
# runs the G-rank correctness tests (qmoe_ep_tests) and the 1-GPU vs G-GPU benchmark (qmoe_ep_bench)
# under the launcher, one process per GPU. Logs and a summary go to $OUT (default /tmp/qmoe-out).
#   scripts/gpu_multi_check.sh
# Environment: OUT, QMOE_EP_WORLD (ranks, default 2), QMOE_CUDA_GENCODE (default sm_90a only, for
# H100/H200; e.g. "-gencode=arch=compute_80,code=sm_80" for Ampere), QMOE_GPU_BUILD (build folder),
# QMOE_NCCL_ROOT (a folder with include/nccl.h and lib/libnccl.so*; default: pip's nvidia-nccl-cu13,
# else the CUDA toolkit). A failing test does not stop the benchmark; the last line says PASS or FAIL.
# NVLink multicast stays off (shared machines): set here and again by the launcher for every rank.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qmoe-out}
mkdir -p "$OUT"
B=${QMOE_GPU_BUILD:-build-gpu-ep}
G=${QMOE_EP_WORLD:-2}
GENCODE=${QMOE_CUDA_GENCODE:--gencode=arch=compute_90a,code=sm_90a}
fail=0
t0=$(date +%s)
{
  date -u
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=index,name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
  nvidia-smi topo -m
  python3 -c 'import nvidia.nccl as m; print("pip NCCL:", list(m.__path__)[0])' 2>&1 | tail -1
  echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE ranks=$G gencode=$GENCODE"
} > "$OUT/ep_gpu.txt" 2>&1
cat "$OUT/ep_gpu.txt"
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$ngpu" -ge "$G" ] || echo "WARNING: $G ranks but $ngpu GPUs visible (the tests will fail)"

# Machines without libonnx-dev: the onnx Python package ships the same onnx.proto (as gpu_check.sh).
extra=()
[ -f /usr/include/onnx/onnx.proto ] ||
  extra+=(-DQMOE_ONNX_PROTO="$(python3 -c 'import onnx,os;print(os.path.join(os.path.dirname(onnx.__file__),"onnx.proto"))')")
[ -d build-devdeps ] && extra+=(-DCMAKE_PREFIX_PATH="$PWD/build-devdeps")
[ -n "${QMOE_NCCL_ROOT:-}" ] && extra+=(-DQMOE_NCCL_ROOT="$QMOE_NCCL_ROOT")
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DQMOE_PYTHON=OFF -DQMOE_BUILD_TESTS=OFF \
  -DQMOE_BUILD_BENCH=OFF -DQMOE_CUDA_GENCODE="$GENCODE" "${extra[@]}" > "$OUT/ep_build.log" 2>&1 &&
  ninja -C "$B" qmoe_ep_launch qmoe_ep_tests qmoe_ep_bench >> "$OUT/ep_build.log" 2>&1 ||
  { echo "build: FAIL"; grep -E "qmoe: NCCL|error|Error" -A3 "$OUT/ep_build.log" | head -40;
    echo "gpu_multi_check: FAIL (build)"; exit 1; }
grep "qmoe: NCCL" "$OUT/ep_build.log"
echo "build: ok ($(( $(date +%s) - t0 )) s)"

L=$B/src/cuda/qmoe_ep_launch
# Tests: G ranks, >= 20 random configurations against the single-GPU backend and the reference.
timeout 230 "$L" -n "$G" --timeout 210 -- "$B/src/cuda/qmoe_ep_tests" > "$OUT/ep_tests.log" 2>&1
rc=$?
[ $rc = 0 ] || fail=1
grep -E "^FAIL|checks passed|device|qmoe_ep_launch|NCCL WARN" "$OUT/ep_tests.log" | head -40
echo "ep_tests: $([ $rc = 0 ] && echo PASS || echo "FAIL (rc=$rc)") ($(grep -c '^PASS' "$OUT/ep_tests.log") PASS lines, $(grep -c '^FAIL' "$OUT/ep_tests.log") FAIL lines; $(( $(date +%s) - t0 )) s)"

# Benchmark: mixtral and deepseek-v3-like at T = 64 and 2048, 1 GPU vs G GPUs, both schemes.
bench_cmd="$L -n $G --timeout 210 -- $B/src/cuda/qmoe_ep_bench --shapes mixtral,deepseek-v3-like --tokens 64,2048"
echo "bench: $bench_cmd" > "$OUT/ep_bench.log"
timeout 230 $bench_cmd >> "$OUT/ep_bench.log" 2>&1
rc=$?
[ $rc = 0 ] || fail=1
cat "$OUT/ep_bench.log"
echo "ep_bench: $([ $rc = 0 ] && echo PASS || echo "FAIL (rc=$rc)") ($(( $(date +%s) - t0 )) s)"

echo "gpu_multi_check: $([ $fail = 0 ] && echo PASS || echo FAIL)" | tee "$OUT/ep_summary.txt"
exit $fail
