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
