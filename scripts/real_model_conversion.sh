#!/usr/bin/env bash
# Relaxed recursive conversion of a real model, before any uptraining (BENCHMARKS.md,
# "real model"): SmolLM2-135M (30 layers) -> 15 shared blocks x 2 loops, each variant's
# validation NLL on the stdlib corpus next to the dense source's. What the SVD-initialised
# per-loop LoRA recovers by rank (RRT §3.2), and the calibrated inits (asvd, sequential).
# Needs `--model smollm2` (README, "A real pretrained model") and data/smollm2-stdlib
# (scripts/bench_real_model.py's docstring).
#   bash scripts/real_model_conversion.sh [OUT.jsonl]
set -euo pipefail
OUT=${1:-results/real_model_conversion.jsonl}
WORK=${WORK:-runs/smollm2-conversion}
EVAL=(--data data/smollm2-stdlib --seq-len 256 --batch-size 4 --max-batches 16 --json)
mkdir -p "$WORK" "$(dirname "$OUT")"
: > "$OUT"
row() {  # name, model dir
    nll=$(earlyexit eval perplexity --model "$2" "${EVAL[@]}")
    echo "{\"variant\": \"$1\", \"eval\": $nll}" >> "$OUT"
    echo "$1: $nll"
}
row "dense source" smollm2
for init in stepwise average; do
    earlyexit convert recursive smollm2 "$WORK/$init-r0" --loops 2 --init "$init" --force --json > /dev/null
    row "$init, no LoRA" "$WORK/$init-r0"
done
for r in 64 128 256 576; do
    earlyexit convert recursive smollm2 "$WORK/stepwise-r$r" --loops 2 --init stepwise \
        --lora-rank "$r" --lora-norms --force --json > /dev/null
    row "stepwise, LoRA $r (SVD) + norms" "$WORK/stepwise-r$r"
done
calibrated_rows() {  # asvd / sequential inits: the same ranks, calibrated on 16k training tokens
    init=$1; short=$2; shift 2
    for r in "$@"; do
        earlyexit convert recursive smollm2 "$WORK/stepwise-$short-r$r" --loops 2 --init stepwise \
            --lora-rank "$r" --lora-norms --lora-init "$init" --calibration-data data/smollm2-stdlib \
            --force --json > /dev/null
        row "stepwise, LoRA $r ($init) + norms" "$WORK/stepwise-$short-r$r"
    done
}
calibrated_rows asvd asvd 64 128 256
calibrated_rows sequential seq 64 256
