#!/usr/bin/env bash
# The search-efficiency comparison of docs/PERFORMANCE.md ("Search efficiency") from the
# committed bank (results/curves): no data, no Ray cluster; tens of minutes on 2 cores
# (Optuna's GPSampler is most of it).
#   bash results/curves/compare.sh [OUT]   (default results/curves/efficiency)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/efficiency}"
mkdir -p "$out"
# 1. every strategy, both groups, 2, 8 and 64 slots, 30 replays each
kdsearch bench --search --bank "$here" --slots 2,8,64 --seeds 30 --json --out "$out/all" \
  > "$out/all.jsonl"
# 2. TPE's random startup, with ASHA, 8 slots
for n in 2 4 8 16; do
  kdsearch bench --search --bank "$here" --strategies tpe+asha --n-startup "$n" --slots 8 \
    --seeds 30 --json --out "$out/startup-$n" > "$out/startup-$n.jsonl"
done
# 3. ASHA's grace period and reduction factor, 8 slots
for g in 1 2 4; do
  for r in 2 3 4; do
    kdsearch bench --search --bank "$here" --strategies random+asha,tpe+asha --grace "$g" \
      --reduction-factor "$r" --slots 8 --seeds 30 --json --out "$out/asha-g$g-r$r" \
      > "$out/asha-g$g-r$r.jsonl"
  done
done
# 4. trials per group (the presets' samples), TPE + ASHA on 2 slots
for n in 8 12 16 24 32; do
  kdsearch bench --search --bank "$here" --strategies tpe+asha --samples "$n" --slots 2 \
    --seeds 30 --json --out "$out/samples-$n" > "$out/samples-$n.jsonl"
done
# 5. the tables of docs/PERFORMANCE.md from the JSON lines above
python "$here/efficiency_table.py" "$out" > "$out/TABLES.md"
