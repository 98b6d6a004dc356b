#!/usr/bin/env bash
# issue 14: locret's new default (exact prefill, evicted tokens in host RAM until the prompt's end, merged) on the H100
set -u
cd /root/hs
export PYTHONPATH=/root/site:/root/hs PYTHONUNBUFFERED=1
R=/root/res
date -u > $R/start.txt; nvidia-smi > $R/nvidia-smi.txt; free -g > $R/free.txt
python3 -m pytest -q -p no:cacheprovider tests/test_locret.py tests/test_merge.py -k cuda > $R/cuda_tests.log 2>&1
python3 benchmarks/exact_then_compress.py --model random:llama-3-8b --device cuda --tokens 120k \
  --json $R/exact_then_compress_llama3_8b_120k.json > $R/mem.log 2>&1
date -u > $R/mem_end.txt
TASKS=niah_single,niah_multikey,niah_multivalue,variable_tracking,common_words,heldout_single,heldout_multikey
pids=()
for run in "smollm2-135m 4k 4096 2" "smollm2-135m 8k 8000 2" "gemma3-270m 8k 8192 2" "gemma3-270m 16k 16384 1" "gemma3-270m 32k 32000 1"; do
  read -r model name tokens samples <<<"$run"
  for setting in inside after; do
    python3 -m headspace eval --model $model --device cuda --dtype float32 --modes locret --compressions 4,8 \
      --haystacks varied,noise --depths 0.1,0.5,0.9 --samples $samples --seed 0 --chunk-size 1024 --lengths $tokens \
      --tasks $TASKS --settings $setting --out $R/tables_${model}_${name}_${setting}.json > $R/tables_${model}_${name}_${setting}.log 2>&1 &
    pids+=($!)
  done
done
BASE="--device cuda --dtype float32 --compressions 8 --haystacks varied,noise --depths 0.1,0.5,0.9 --samples 4 --seed 0 --chunk-size 1024 --settings after --tasks niah_single,niah_multikey,heldout_single,heldout_multikey"
for run in "gemma3-270m 8192" "gemma3-270m 16384" "gemma3-270m 32000" "smollm2-135m 4096" "smollm2-135m 8000"; do
  read -r model len <<<"$run"
  python3 -m headspace eval --model $model $BASE --lengths $len --modes locret --out $R/after_${model}_${len}.json > $R/after_${model}_${len}.log 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
date -u > $R/end.txt
touch $R/done
