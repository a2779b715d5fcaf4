#!/usr/bin/env python3
"""Sums build-fuzz/fuzz-stats.tsv (one line per scripts/fuzz.sh run) per fuzzer: total seconds,
total executions, the highest cov/ft seen and the number of runs that failed. Prints a Markdown
table for docs/RELIABILITY.md.

    python3 fuzz/stats.py [build-fuzz/fuzz-stats.tsv]
"""
import collections
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "build-fuzz/fuzz-stats.tsv"
tot = collections.OrderedDict()
for line in open(path):
    f = line.rstrip("\n").split("\t")
    if len(f) < 8:
        continue
    _, name, secs, execs, cov, ft, corp, result = f[:8]
    t = tot.setdefault(name, dict(runs=0, secs=0, execs=0, cov=0, ft=0, corp=0, fails=0))
    t["runs"] += 1
    t["secs"] += int(secs)
    t["execs"] += int(execs) if execs.isdigit() else 0
    t["cov"] = max(t["cov"], int(cov) if cov.isdigit() else 0)
    t["ft"] = max(t["ft"], int(ft) if ft.isdigit() else 0)
    t["corp"] = max(t["corp"], int(corp) if corp.isdigit() else 0)
    t["fails"] += result != "ok"
print("| fuzzer | runs | total time | executions | cov (max) | ft (max) | corpus | failed runs |")
print("|---|---|---|---|---|---|---|---|")
for n, t in tot.items():
    print("| fuzz_%s | %d | %d min %02d s | %d | %d | %d | %d | %d |" % (
        n, t["runs"], t["secs"] // 60, t["secs"] % 60, t["execs"], t["cov"], t["ft"], t["corp"], t["fails"]))
