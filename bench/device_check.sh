#!/usr/bin/env bash
# One-call GPU check for the lent device machine: CUDA tests, then the training-step benchmark
# of every group at the paper's models (ResNet-18 student, ResNet-50+CBAM teacher, batch 64),
# alone and with K trials sharing the GPU. Writes everything under ${OUT:-./device-out}.
# Usage (from the repository root, with the venv carried along):  bash bench/device_check.sh
set -uo pipefail
OUT="${OUT:-./device-out}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/device.txt" 2>&1
"$PY" -m pytest -q -m cuda tests > "$OUT/cuda-tests.txt" 2>&1; echo "cuda tests rc=$?" >> "$OUT/cuda-tests.txt"
"$PY" -m search.cli bench --device cuda --batch 64 --steps 30 --warmup 5 --json --feeds device,dataloader --workers 8 \
  > "$OUT/bench-cuda.jsonl" 2> "$OUT/bench-cuda.err"
for k in 2 4; do
  "$PY" -m search.cli bench --device cuda --batch 64 --steps 30 --warmup 5 --json --feeds device \
    --group kd --concurrent "$k" >> "$OUT/bench-cuda-concurrent.jsonl" 2>> "$OUT/bench-cuda.err"
done
"$PY" -m search.cli bench --device cuda --batch 64 --steps 30 --warmup 10 --json --feeds device --group kd --compile \
  > "$OUT/bench-cuda-compile.jsonl" 2>> "$OUT/bench-cuda.err"
cat "$OUT"/*.jsonl
