#!/usr/bin/env bash
# The converted SmolLM2's loop exit, and serving it (BENCHMARKS.md, "real model"): the
# relaxed recursive model (15 shared blocks x 2 loops, uptrained: smollm2-rec-uptrain)
# gets an exit after loop 1 on its frozen body (recipe smollm2-rec-exit, ~22 min on 2
# cores), its quality is swept by threshold at batch 1 against its own full depth, then it
# is served with the source model as vanilla under static / continuous / depth-wise
# batching at max batch 8, 16 and 32 (~35 min).
# Needs `--model smollm2` (README, "A real pretrained model"), data/smollm2-stdlib and
# runs/smollm2-rec/final (the uptraining recipe's output).
#   bash scripts/real_model_loop_exit.sh [THRESHOLD]
set -euo pipefail
THRESHOLD=${1:-0.5}
[ -d runs/smollm2-rec-exit/final ] || earlyexit train --preset smollm2-rec-exit --no-progress
: > results/real_model_loop_exit_agreement.jsonl
for t in 0.9 0.7 0.5 0.3; do
    for kv in propagate skip; do
        earlyexit eval agreement --model runs/smollm2-rec-exit/final --data data/smollm2-stdlib \
            --strategy calm --threshold "$t" --deep-kv "$kv" --prompts 16 --prompt-len 32 \
            --new-tokens 32 --json | tail -1 >> results/real_model_loop_exit_agreement.jsonl
    done
done
cp runs/smollm2-rec-exit/metrics.jsonl results/real_model_loop_exit.metrics.jsonl
earlyexit bench depthwise --dense smollm2 --recursive runs/smollm2-rec-exit/final \
    --data data/smollm2-stdlib --threshold "$THRESHOLD" --prompts 64 --new-tokens 32 \
    --batch-sizes 8 16 32 --deep-kv propagate skip --exit-vocab 8192 --repeats 2 --threads 2 \
    --out results/depthwise_smollm2.json
