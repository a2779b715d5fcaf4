#!/bin/bash
# qmoe's CPU backend and ONNX Runtime's CPU QMoE on the same shapes, alternated per (shape, quant) so
# both see similar load on a shared machine; qmoe runs once per compute mode (default: the exact fp32
# kernels, then the bf16 and int8 accuracy options, CpuBackendOptions::compute). Build first:
# cmake -S . -B build-cpu -G Ninja && ninja -C build-cpu qmoe_bench_cpu.
# Usage: bench/run_cpu_vs_ort.sh [BUILD_DIR] [THREADS] [TOKENS] [COMPUTES]
#   e.g. bench/run_cpu_vs_ort.sh build-cpu 2 8,64,512 "exact bf16 int8"
set -euo pipefail
build=${1:-build-cpu}
threads=${2:-2}
tokens=${3:-1,8,64,512}
computes=${4:-exact bf16 int8}
for shape in mixtral qwen3; do
  for q in int4b32 int4b128 int8; do
    for c in $computes; do
      echo "=== $shape $q qmoe compute $c $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
      "$build/bench/qmoe_bench_cpu" --threads "$threads" --shapes "$shape" --quants "$q" --tokens "$tokens" \
        --cpu-compute "$c" --min-time 1
    done
    echo "=== $shape $q ort $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    python3 "$(dirname "$0")/ort_cpu_peer.py" --threads "$threads" --shapes "$shape" --quants "$q" --tokens "$tokens" \
      --min-time 1.0
  done
done
