#!/usr/bin/env bash
# Rebuild the bank of learning curves in results/curves (issue 20; docs/PERFORMANCE.md,
# "Search efficiency"). Needs the CIFAR-10 JPEG copy; hours on 2 CPU cores.
#   bash results/curves/make_bank.sh [STORAGE]   (default /tmp/kdsearch-bank)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
storage="${1:-/tmp/kdsearch-bank}"
data="imagefolder:${KDSEARCH_DATA_DIR:-$here/../../../shared/data/cifar10-jpeg}"
for study in bank seed1 seed2; do
  kdsearch tune --preset laptop --data "$data" --storage "$storage" --config "$here/$study.toml"
done
# Status (docs/PERFORMANCE.md, "The bank"): on 2026-12-02 study `curves` was stopped after
# 33 kd and 32 at configurations and committed as results/curves/curves. Continue it with a
# second design study (its own Sobol scramble, no warm start), e.g. study = "curves-b",
# seed = 1, samples = 16, then the two seed studies.
