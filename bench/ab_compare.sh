#!/usr/bin/env bash
# Side-by-side graph µs of qmoe_cuda_bench logs: one row per (shape, quant, T) with the bytes floor,
# then one column per log, in the order given. Used by cuda_device_ab.sh; also by hand:
#   bench/ab_compare.sh OUT/bench_base.log OUT/bench_new.log
awk 'FNR == 1 { n++; name[n] = FILENAME; sub(/.*bench_/, "", name[n]); sub(/\.log$/, "", name[n]) }
     $1 != "device" && $1 != "measured" && $1 !~ /^#/ && NF >= 11 && $3 ~ /^[0-9]+$/ {
       k = $1 " " $2 " " $3
       if (!(k in seen)) { seen[k] = 1; order[++m] = k }
       v[k, n] = $5; floor[k] = $8
     }
     END {
       printf "shape quant T floor_us"; for (i = 1; i <= n; i++) printf " %s", name[i]; print ""
       for (j = 1; j <= m; j++) {
         k = order[j]; printf "%s %s", k, floor[k]
         for (i = 1; i <= n; i++) printf " %s", ((k, i) in v) ? v[k, i] : "-"
         print ""
       }
     }' "$@"
