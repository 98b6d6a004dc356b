#!/usr/bin/env bash
# the driver: eviction after compression with more samples, and the memory of an exact prefill then compression
set -u
cd /root/hs
export PYTHONPATH=/root/site:/root/hs PYTHONUNBUFFERED=1
R=/root/res
date -u > $R/start.txt; nvidia-smi > $R/nvidia-smi.txt; lscpu > $R/lscpu.txt
TASKS=niah_single,niah_multikey,heldout_single,heldout_multikey
BASE="--device cuda --dtype float32 --compressions 8 --haystacks varied,noise --depths 0.1,0.5,0.9 --samples 4 --seed 0 --chunk-size 1024 --settings after --tasks $TASKS"
MODES=full,locret,offload+locret,streamingllm,snapkv,snapkv-question,expected-attention,tova,knorm,h2o,pyramidkv,random
pids=()
python3 -m pytest -q -p no:cacheprovider tests/test_locret.py -k cuda > $R/cuda_tests.log 2>&1
PYTHONPATH=/root/site:/root/hs/.g2/orig python3 -m pytest -q -p no:cacheprovider tests/test_locret.py -k "cuda and queue" > $R/cuda_tests_before_fix.log 2>&1
python3 benchmarks/exact_then_compress.py --model random:llama-3-8b --device cuda --tokens 128k --json $R/exact_then_compress_llama3_8b_128k.json > $R/mem.log 2>&1 &
pids+=($!)
for run in "gemma3-270m 8192" "gemma3-270m 16384" "gemma3-270m 32000" "smollm2-135m 4096" "smollm2-135m 8000"; do
  read -r model len <<<"$run"
  python3 -m headspace eval --model $model $BASE --lengths $len --modes $MODES --out $R/after_${model}_${len}.json > $R/after_${model}_${len}.log 2>&1 &
  pids+=($!)
  python3 -m headspace eval --model $model $BASE --lengths $len --modes offload+locret --option offload+locret.release=1 --option offload+locret.merge=64 --out $R/release_${model}_${len}.json > $R/release_${model}_${len}.log 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
date -u > $R/end.txt
touch $R/done
