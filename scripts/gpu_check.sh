#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU (issue 10): the GPU tests, then the decode
# and depthwise benchmarks on the device, writing results/*_cuda.json and a log under $OUT
# (or ./gpu-out). Everything is trained here on the GPU (minutes), nothing is downloaded.
#   bash scripts/gpu_check.sh            # ~10 minutes on one H100/H200-class GPU
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" results
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
nvidia-smi | tee "$OUT/nvidia-smi.txt" || true
pip install -q torch==2.13.0 2>/dev/null || true   # keep whatever CUDA build is installed if this fails
pip install -q -e '.[dev]'
log "gpu tests"
python -m pytest -m gpu -q 2>&1 | tee "$OUT/pytest-gpu.txt"
log "decode, fp32 and bf16, eager and compiled"
earlyexit bench decode --device cuda --compile --batch-sizes 1 8 32 --out results/decode_cuda.json | tee "$OUT/decode-fp32.txt"
earlyexit bench decode --device cuda --dtype bfloat16 --compile --batch-sizes 1 8 32 --out results/decode_cuda_bf16.json | tee "$OUT/decode-bf16.txt"
log "train the depthwise models on the GPU"
earlyexit prepare --corpus stdlib --out data/stdlib
for p in stdlib-small stdlib-small-free; do earlyexit train --preset $p --resume --device cuda --no-progress; done
earlyexit convert recursive runs/stdlib-small/final runs/stdlib-small-rec-init --loops 2 --force
for p in stdlib-small-rec stdlib-small-rec-exit stdlib-small-mor; do earlyexit train --preset $p --resume --device cuda --no-progress; done
log "depthwise on the GPU"
earlyexit bench depthwise --device cuda --dense runs/stdlib-small/final --recursive runs/stdlib-small-rec-exit/final \
    --exit-model runs/stdlib-small-free/final --mor runs/stdlib-small-mor/final --threshold 0.3 \
    --out results/depthwise_cuda.json | tee "$OUT/depthwise.txt"
cp results/*_cuda*.json "$OUT/"
log "done"
