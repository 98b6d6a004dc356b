#!/usr/bin/env bash
# Retaining heads for SmolLM2-135M and Gemma 3 270M with TrainConfig's default recipe (needles spliced into
# offline text, every stated fact's sentence lifted to its largest target: span targets 'statement'), then benchmarks/locret_diagnose.py for the new heads and
# for the shipped ones, on one GPU.
#
#   benchmarks/heads_gpu.sh            # train both (~1-2 min each on an H100), diagnose four ways (~1-2 min each)
#
# Outputs under OUT (default benchmarks/results/heads): MODEL.retaining.safetensors (the new heads, their
# command and recipe in the metadata), diagnose_MODEL_{new,shipped}.json and .log (tables: where the needles'
# value and key tokens rank under the heads and under the question's own attention, what each keeps at 4x and
# 8x, the answers of full, locret and the oracle). Copy the new heads over headspace/data/MODEL.retaining.
# safetensors when the diagnosis and `headspace eval` say they are better.
#
# Environment: OUT, DEVICE (cuda), STEPS (400), SEQ_LEN (2048), DOCUMENTS (4 per family), SKIP_TRAIN (1: only
# diagnose heads already in OUT).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/heads}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-400}
SEQ_LEN=${SEQ_LEN:-2048}
DOCUMENTS=${DOCUMENTS:-4}
mkdir -p "$OUT"

declare -A LENGTH=([smollm2-135m]=2048 [gemma3-270m]=8192)
for model in smollm2-135m gemma3-270m; do
  heads="$OUT/$model.retaining.safetensors"
  if [[ "${SKIP_TRAIN:-0}" != 1 ]]; then
    python3 -m headspace train-retaining --model "$model" --device "$DEVICE" --out "$heads" --steps "$STEPS" \
      --seq-len "$SEQ_LEN"
  fi
  for which in new shipped; do
    args=()
    [[ $which == new ]] && args=(--heads "$heads")
    python3 -u benchmarks/locret_diagnose.py --model "$model" --device "$DEVICE" --length "${LENGTH[$model]}" \
      --documents "$DOCUMENTS" "${args[@]}" --json "$OUT/diagnose_${model}_$which.json" \
      > "$OUT/diagnose_${model}_$which.log" 2>&1
    tail -n 45 "$OUT/diagnose_${model}_$which.log"
  done
done
