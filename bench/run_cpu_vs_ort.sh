#!/bin/bash
# qmoe's CPU backend and ONNX Runtime's CPU QMoE on the same shapes, alternated per (shape, quant) so
# both see similar load on a shared machine. Build first: cmake -S . -B build-cpu -G Ninja &&
# ninja -C build-cpu qmoe_bench_cpu. Usage: bench/run_cpu_vs_ort.sh [BUILD_DIR] [THREADS]
set -euo pipefail
build=${1:-build-cpu}
threads=${2:-2}
for shape in mixtral qwen3; do
  for q in int4b32 int4b128 int8; do
    echo "=== $shape $q qmoe $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    "$build/bench/qmoe_bench_cpu" --threads "$threads" --shapes "$shape" --quants "$q" --min-time 1
    echo "=== $shape $q ort $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    python3 "$(dirname "$0")/ort_cpu_peer.py" --threads "$threads" --shapes "$shape" --quants "$q" --min-time 1.0
  done
done
