#!/usr/bin/env bash
# One-call GPU check for the lent device machine: CUDA tests, `kdsearch bench` of every group
# (device feed vs DataLoader, K = 1/2/4 processes, torch.compile on/off), then a Ray-free
# mini-study at the paper's models on the packed CIFAR-10, each stage with a deadline.
# Needs only the image's python3 (torch, torchvision, numpy, pandas, pyarrow, scipy,
# matplotlib, pytest): no Ray, no Optuna, no install. Results go to $OUT (default ./device-out).
# Usage, from the repository root:
#   bash bench/device_check.sh              # on the GPU machine (reads packs/cifar10.jpegpack)
#   PY=python3 bash bench/device_check.sh --dry-run   # every stage on the CPU, tiny sizes
# See bench/device_check.py and docs/PERFORMANCE.md ("GPU device check").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
exec "${PY:-python3}" bench/device_check.py "$@"
