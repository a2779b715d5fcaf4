#!/bin/bash
# One case, qmoe's CPU backend against ONNX Runtime's CPU QMoE in N alternating pairs (qmoe, then ORT,
# N times), so both see the same minutes of a machine whose speed drifts; prints each pair's ratio of
# wall and CPU time and the medians. For a speed-up near a target, one pair says little: ORT alone
# moved 197-213 ms between pairs on the 2-core machine (docs/PERF.md).
# Build first: cmake -S . -B build-cpu -G Ninja && ninja -C build-cpu qmoe_bench_cpu.
# Usage: bench/cpu_vs_ort_pairs.sh BUILD_DIR SHAPE QUANT TOKENS COMPUTE [PAIRS] [THREADS]
#   e.g. bench/cpu_vs_ort_pairs.sh build-cpu mixtral int4b32 64 int8 5
set -euo pipefail
[ $# -ge 5 ] || { sed -n '7,8p' "$0"; exit 2; }
build=$1 shape=$2 quant=$3 tokens=$4 compute=$5 pairs=${6:-5} threads=${7:-2}
case "$tokens" in *,*) echo "one token count per run, got '$tokens'" >&2; exit 2 ;; esac
echo "pair  qmoe_us  qmoe_cpu_us  ort_us  ort_cpu_us  wall  cpu   ($shape $quant T=$tokens, qmoe --cpu-compute $compute, $threads threads)"
for ((i = 1; i <= pairs; ++i)); do
  q=$("$build/bench/qmoe_bench_cpu" --threads "$threads" --shapes "$shape" --quants "$quant" --tokens "$tokens" \
        --cpu-compute "$compute" --min-time 1 | awk -v s="$shape" '$1 == s {print $4, $5}')
  o=$(python3 "$(dirname "$0")/ort_cpu_peer.py" --threads "$threads" --shapes "$shape" --quants "$quant" \
        --tokens "$tokens" --min-time 1.0 | awk -v s="$shape" '$1 == s {print $4, $5}')
  [ -n "$q" ] && [ -n "$o" ] || { echo "pair $i: a run printed no result" >&2; exit 1; }
  echo "$i $q $o"
done | awk '{w = $4 / $2; c = $5 / $3; printf "%4d %8.0f %12.0f %7.0f %11.0f %5.2fx %5.2fx\n", $1, $2, $3, $4, $5, w, c
             W[NR] = w; C[NR] = c}
     function median(a, n,   i, j, t) {
       for (i = 1; i <= n; ++i) for (j = i + 1; j <= n; ++j) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
       return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
     }
     END { n = NR; printf "median over %d pairs: %.2fx wall, %.2fx CPU time\n", n, median(W, n), median(C, n) }'
