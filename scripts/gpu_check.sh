#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU (issue 10): the GPU tests, then the decode
# and depthwise benchmarks on the device. Offline-safe: it installs nothing and runs the
# package from this checkout (the lent H200 image has torch, transformers, tokenizers,
# safetensors, numpy, tqdm, pytest, hypothesis, matplotlib; FastAPI is not needed here).
# Everything is trained here on the GPU (minutes), nothing is downloaded. Logs and JSON rows
# go to $OUT (the device tool's folder) or ./gpu-out.
#   bash scripts/gpu_check.sh      # sized for ~10 minutes on one H100/H200-class GPU
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ee() { "$PY" -m earlyexit "$@"; }
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/log.txt"
log "gpu tests"
"$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt" || true
log "decode: fp32 and bf16, eager and compiled (CUDA graphs)"
ee bench decode --device cuda --compile --batch-sizes 1 8 --out "$OUT/decode_cuda.json" 2>&1 | tee "$OUT/decode.txt" || true
ee bench decode --device cuda --dtype bfloat16 --compile --batch-sizes 1 8 --out "$OUT/decode_cuda_bf16.json" 2>&1 | tee -a "$OUT/decode.txt" || true
log "train the depthwise models on the GPU"
ee prepare --corpus stdlib --out data/stdlib
for p in stdlib-small stdlib-small-free; do ee train --preset "$p" --resume --device cuda --no-progress; done
ee convert recursive runs/stdlib-small/final runs/stdlib-small-rec-init --loops 2 --force
for p in stdlib-small-rec stdlib-small-rec-exit stdlib-small-mor; do ee train --preset "$p" --resume --device cuda --no-progress; done
log "depthwise on the GPU"
ee bench depthwise --device cuda --dense runs/stdlib-small/final --recursive runs/stdlib-small-rec-exit/final \
    --exit-model runs/stdlib-small-free/final --mor runs/stdlib-small-mor/final --threshold 0.3 \
    --out "$OUT/depthwise_cuda.json" 2>&1 | tee "$OUT/depthwise.txt"
log "synthetic-exit sweep on the GPU in bf16 (issue 15: the systems map, random weights)"
ee bench depthwise --synthetic --device cuda --dtype bfloat16 --presets smollm-135m smollm-360m llama-3.2-1b \
    --batch-sizes 8 16 32 --prompts 64 --new-tokens 32 --out "$OUT/depthwise_synthetic_cuda.json" 2>&1 | tee "$OUT/synthetic.txt" || true
log "the same with exits that leave no catch-up and a pruned exit head (SmolLM shape)"
ee bench depthwise --synthetic --device cuda --dtype bfloat16 --presets smollm-135m --batch-sizes 8 16 32 \
    --prompts 64 --new-tokens 32 --exit-rates 0.5 0.75 --exit-vocab 8192 --deep-kv propagate skip \
    --out "$OUT/depthwise_synthetic_nocatchup_cuda.json" 2>&1 | tee "$OUT/synthetic_nocatchup.txt" || true
log "done"
