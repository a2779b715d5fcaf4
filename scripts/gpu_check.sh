#!/usr/bin/env bash
# Everything that needs a GPU, in one go (sm_80+ NVIDIA GPU, CUDA toolkit; PyTorch for the torch
# tests): builds the CUDA backend with its test program, the CLI and the Python module; runs
# qmoe_cuda_tests, compute-sanitizer memcheck/racecheck/initcheck on the quick subset, `qmoe demo` on
# the GPU, and the Python suites (torch CPU and CUDA tensors). Logs go to $OUT (default /tmp/qmoe-out).
#   scripts/gpu_check.sh            (QMOE_CUDA_GENCODE overrides the architectures, e.g. sm_90a only)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qmoe-out}
mkdir -p "$OUT"
B=${QMOE_GPU_BUILD:-build-gpu}
fail=0
{ date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; } | tee "$OUT/gpu.txt"

# Machines without libonnx-dev: the onnx Python package ships the same onnx.proto.
extra=()
[ -f /usr/include/onnx/onnx.proto ] ||
  extra+=(-DQMOE_ONNX_PROTO="$(python3 -c 'import onnx,os;print(os.path.join(os.path.dirname(onnx.__file__),"onnx.proto"))')")
[ -d build-devdeps ] && extra+=(-DCMAKE_PREFIX_PATH="$PWD/build-devdeps")  # CLI11/nlohmann headers, if carried
[ -n "${QMOE_CUDA_GENCODE:-}" ] && extra+=(-DQMOE_CUDA_GENCODE="$QMOE_CUDA_GENCODE")
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON -DQMOE_PYTHON=ON -DQMOE_BUILD_TESTS=OFF \
  -DQMOE_BUILD_BENCH=OFF -DQMOE_CUDA_BENCH=OFF -DPython_EXECUTABLE="$(command -v python3)" "${extra[@]}" \
  > "$OUT/build.log" 2>&1 && ninja -C "$B" qmoe_cuda_tests qmoe_cli _qmoe >> "$OUT/build.log" 2>&1 ||
  { echo "build failed"; grep -E "error|Error" -A3 "$OUT/build.log" | head -40; exit 1; }
echo "build ok"

T=$B/src/cuda/qmoe_cuda_tests
timeout 400 "$T" > "$OUT/cuda_tests.log" 2>&1 & p0=$!
timeout 400 "$T" --gemm sm90 > "$OUT/cuda_tests_sm90.log" 2>&1 & p9=$!  # the wgmma kernels forced on (Hopper)
# ... at width 128 for every layer, so items of every size run the narrower wgmma of item_width (fc_sm90.cu)
QMOE_CUDA_SM90_N=128 timeout 400 "$T" --gemm sm90 > "$OUT/cuda_tests_n128.log" 2>&1 & p8=$!
QMOE_CUDA_SM90_N=128 timeout 400 compute-sanitizer --tool racecheck --error-exitcode 9 "$T" --quick --gemm sm90 \
  > "$OUT/racecheck_n128.log" 2>&1 & p_racecheck_n128=$!
# ... and at width 192 where it serves a layer (4-bit, row-wise or DQ; else 128), items of 129+ tokens on the --wide subset
QMOE_CUDA_SM90_N=192 timeout 400 "$T" --gemm sm90 > "$OUT/cuda_tests_n192.log" 2>&1 & p192=$!
QMOE_CUDA_SM90_N=192 timeout 400 compute-sanitizer --tool racecheck --error-exitcode 9 "$T" --wide --gemm sm90 \
  > "$OUT/racecheck_n192.log" 2>&1 & p_racecheck_n192=$!
for tool in memcheck racecheck initcheck; do  # the quick subset with the default and the wgmma kernels,
  timeout 400 compute-sanitizer --tool $tool --error-exitcode 9 "$T" --quick > "$OUT/$tool.log" 2>&1 &
  eval "p_$tool=\$!"
  timeout 400 compute-sanitizer --tool $tool --error-exitcode 9 "$T" --quick --gemm sm90 > "$OUT/${tool}_sm90.log" 2>&1 &
  eval "p_${tool}_sm90=\$!"
  # and the wgmma kernels at their widest (the quick subset stays below 48 tokens per expert)
  timeout 400 compute-sanitizer --tool $tool --error-exitcode 9 "$T" --wide --gemm sm90 > "$OUT/${tool}_wide.log" 2>&1 &
  eval "p_${tool}_wide=\$!"
done
wait $p0; rc=$?; [ $rc = 0 ] || fail=1; echo "qmoe_cuda_tests rc=$rc"; grep -E "FAIL|passed" "$OUT/cuda_tests.log" | tail -5
wait $p9; rc=$?; [ $rc = 0 ] || fail=1; echo "qmoe_cuda_tests --gemm sm90 rc=$rc"
grep -E "FAIL|passed|workspace" "$OUT/cuda_tests_sm90.log" | tail -5
wait $p8; rc=$?; [ $rc = 0 ] || fail=1; echo "qmoe_cuda_tests --gemm sm90, width 128 rc=$rc"
grep -E "FAIL|passed|workspace" "$OUT/cuda_tests_n128.log" | tail -5
wait $p192; rc=$?; [ $rc = 0 ] || fail=1; echo "qmoe_cuda_tests --gemm sm90, width 192 rc=$rc"
grep -E "FAIL|passed|workspace" "$OUT/cuda_tests_n192.log" | tail -5
for tool in memcheck racecheck initcheck memcheck_sm90 racecheck_sm90 initcheck_sm90 memcheck_wide racecheck_wide \
  initcheck_wide racecheck_n128 racecheck_n192; do
  eval "wait \$p_$tool"; rc=$?; [ $rc = 0 ] || fail=1
  echo "$tool rc=$rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1)"
done

"$B/tools/qmoe/qmoe" demo --backend cuda > "$OUT/demo.log" 2>&1 || fail=1
cat "$OUT/demo.log"

export PYTHONPATH=$PWD/$B/python PYTHONUNBUFFERED=1
timeout 300 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/python/test_torch.py \
  tests/python/test_layer.py > "$OUT/pytest.log" 2>&1 || fail=1
grep -E "passed|failed|^FAILED|^ERROR|Fatal" "$OUT/pytest.log" | tail -15
if grep -q "Fatal Python error" "$OUT/pytest.log" && command -v gdb >/dev/null; then
  t=$(grep -B1 -m1 "Fatal Python error" "$OUT/pytest.log" | grep -o 'test_[a-z_]*' | head -1)
  gdb -q -batch -ex run -ex bt --args python3 -m pytest -x -q -p no:cacheprovider tests/python/test_layer.py -k "$t" \
    > "$OUT/gdb.log" 2>&1
  grep -E "^#[0-9]+ " "$OUT/gdb.log" | head -25
fi
echo "gpu_check: $([ $fail = 0 ] && echo PASS || echo FAIL)"
exit $fail
