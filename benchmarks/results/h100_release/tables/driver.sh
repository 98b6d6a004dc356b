#!/usr/bin/env bash
# offload+locret release=1 merge=64 through the issue-14 tables' configuration (eval_gpu.sh), both settings, 4x and 8x
set -u
cd /root/hs
export PYTHONPATH=/root/site:/root/hs PYTHONUNBUFFERED=1
R=/root/res
date -u > $R/start.txt
TASKS=niah_single,niah_multikey,niah_multivalue,variable_tracking,common_words,heldout_single,heldout_multikey
pids=()
for run in "smollm2-135m 4k 4096 2" "smollm2-135m 8k 8000 2" "gemma3-270m 8k 8192 2" "gemma3-270m 16k 16384 1" "gemma3-270m 32k 32000 1"; do
  read -r model name tokens samples <<<"$run"
  for setting in inside after; do
    python3 -m headspace eval --model $model --device cuda --dtype float32 --modes offload+locret --compressions 4,8 \
      --haystacks varied,noise --depths 0.1,0.5,0.9 --samples $samples --seed 0 --chunk-size 1024 --lengths $tokens \
      --tasks $TASKS --settings $setting --option offload+locret.release=1 --option offload+locret.merge=64 \
      --out $R/release_tables_${model}_${name}_${setting}.json > $R/release_tables_${model}_${name}_${setting}.log 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait $p; done
date -u > $R/end.txt
touch $R/done
