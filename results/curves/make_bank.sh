#!/usr/bin/env bash
# Rebuild the bank of learning curves in results/curves (issue 20; docs/PERFORMANCE.md,
# "Search efficiency"). Needs the CIFAR-10 JPEG copy; hours on 2 CPU cores.
#   bash results/curves/make_bank.sh [STORAGE]   (default /tmp/kdsearch-bank)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
storage="${1:-/tmp/kdsearch-bank}"
data="imagefolder:${KDSEARCH_DATA_DIR:-$here/../../../shared/data/cifar10-jpeg}"
# What was run, in this order (2026-12-02): bank (study curves, stopped after 33 kd and 32 at of
# its 48; a rebuild runs all 48), seed1 (curves-seed1, stopped after 8 kd and 7 at), bank-b
# (curves-b: 17 more per group from a second Sobol scramble), seed2 (curves-seed2), and
# seed1-at8 (the one at configuration curves-seed1 did not finish).
for study in bank seed1 bank-b seed2 seed1-at8; do
  kdsearch tune --preset laptop --data "$data" --storage "$storage" --config "$here/$study.toml"
done
