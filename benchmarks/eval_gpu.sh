#!/usr/bin/env bash
# The evaluation tables of issue 14 on one GPU: SmolLM2-135M at 4K and 8K tokens, Gemma 3 270M at 8K, 16K
# and 32K; every RULER-style task and the held-out family; full, locret and every baseline at 4x and 8x;
# the question inside the compressed prompt and questions after compression.
#
#   benchmarks/eval_gpu.sh          # run (or resume) everything within CALL seconds, then write the tables
#
# Run the same command again until it prints "all tables written": every generation is written to its JSON as
# it ends, so a call that runs out of time loses only the generations in flight, and the next resumes. Each
# (model, length, setting) runs in its own process, all ten at once: the models are tiny, so a run is bound by
# Python and kernel launches, not by the GPU, and the processes share one H100 (16 cores).
#
# Per (model, length): 21 columns (full; 10 policies x 2 ratios), two samples per cell (one for Gemma 3 at 16K and
# 32K, the slow pairs), varied and noise haystacks, depths 0.1/0.5/0.9. Per sample, inside: 17 prompts per column
# (357 generations); after: 6 documents prefilled once per column (per haystack a shared one and the multi-value
# prompt; common words; the ship's log) and 17 questions (357 answers). 5,712 generations over the five pairs.
# Estimate on the H100 (float32; the earlier SmolLM2 run: ~45 ms per decoded token, ~300 tokens per column and
# setting): 4-6 min for each SmolLM2 and Gemma 8K/16K process alone, ~8 min for Gemma 32K inside (32 chunks of
# 1024 per prefill); with ten processes sharing the GPU, two calls of 10 minutes should finish, a third is spare.
#
# Outputs, per MODEL_LEN (smollm2-135m_4k, smollm2-135m_8k, gemma3-270m_8k, gemma3-270m_16k, gemma3-270m_32k):
#   benchmarks/results/eval_MODEL_LEN.json   every record (setting, task, haystack, depth, mode, score, digits)
#   benchmarks/results/eval_MODEL_LEN.md     the table: inside rows, [after] rows, group means, held-out apart
#   benchmarks/results/eval_MODEL_LEN.png    single-needle heatmap (varied haystack), and ..._after.png
# The per-setting runs write benchmarks/results/parts/eval_MODEL_LEN_SETTING.json (and .log); a finished part is
# not run again, so delete benchmarks/results/parts (and the eval_*.json) to start over with other settings.
#
# Environment: CALL (seconds the whole call may take, default 570; the tables get the last REPORT=90), CHUNK
# (prefill chunk, default 1024: a 4K prompt is evicted from four times, so no mode sees the question before it
# compresses), DTYPE (float32), DEVICE (cuda), MODES and TASKS (default: every mode and task above), PARTS
# (where the per-setting runs go; on a machine whose working tree is copied afresh for each call, a folder
# outside it, e.g. PARTS=/root/parts, keeps them from one call to the next).
set -euo pipefail
cd "$(dirname "$0")/.."

CALL=${CALL:-570}
REPORT=90
CHUNK=${CHUNK:-1024}
DTYPE=${DTYPE:-float32}
DEVICE=${DEVICE:-cuda}
TASKS=${TASKS:-niah_single,niah_multikey,niah_multivalue,variable_tracking,common_words,heldout_single,heldout_multikey}
MODES=${MODES:-full,locret,streamingllm,snapkv,snapkv-question,expected-attention,tova,knorm,h2o,pyramidkv,random}
RESULTS=benchmarks/results
PARTS=${PARTS:-$RESULTS/parts}
RUNS=("smollm2-135m 4k 4096 2" "smollm2-135m 8k 8000 2" "gemma3-270m 8k 8192 2" "gemma3-270m 16k 16384 1"
      "gemma3-270m 32k 32000 1")  # model, name, tokens, samples per cell
SETTINGS=(inside after)
mkdir -p "$PARTS"

eval_args() {  # MODEL TOKENS SAMPLES: the arguments every run of that pair shares
    echo --model "$1" --device "$DEVICE" --dtype "$DTYPE" --modes "$MODES" --compressions 4,8 \
        --haystacks varied,noise --depths 0.1,0.5,0.9 --samples "$3" --seed 0 --chunk-size "$CHUNK" --lengths "$2" \
        --tasks "$TASKS"
}

done_json() {  # a results file the harness finished (it writes the table last)
    [ -f "$1" ] && python3 -c "import json, sys; sys.exit(0 if 'table' in json.load(open('$1')) else 1)"
}

records() {
    python3 -c "import json; print(len(json.load(open('$1'))['records']))" 2>/dev/null || echo 0
}

# the first load of each model dequantizes its GGUF into the cache: once, before the parallel runs
python3 -c "import headspace; [headspace.load_model(m, device='cpu') for m in ('smollm2-135m', 'gemma3-270m')]"

limit=$((CALL - SECONDS - REPORT))
pids=()
for run in "${RUNS[@]}"; do
    read -r model name tokens samples <<<"$run"
    for setting in "${SETTINGS[@]}"; do
        part=$PARTS/eval_${model}_${name}_${setting}.json
        done_json "$part" && continue
        # shellcheck disable=SC2046
        timeout "$limit" python3 -m headspace eval $(eval_args "$model" "$tokens" "$samples") --settings "$setting" \
            --out "$part" >>"${part%.json}.log" 2>&1 &
        pids+=($!)
    done
done
for pid in "${pids[@]}"; do wait "$pid" || true; done  # 124: out of time, resumed by the next call

missing=0
pids=()
for run in "${RUNS[@]}"; do
    read -r model name tokens samples <<<"$run"
    out=$RESULTS/eval_${model}_${name}.json
    parts=()
    for setting in "${SETTINGS[@]}"; do parts+=("$PARTS/eval_${model}_${name}_${setting}.json"); done
    unfinished=0
    for part in "${parts[@]}"; do
        if ! done_json "$part"; then
            echo "unfinished: $part ($(records "$part") records): run this script again"
            unfinished=1
        fi
    done
    if [ "$unfinished" = 1 ]; then missing=1; continue; fi
    done_json "$out" && continue
    python3 -c "
import json, sys
parts = [json.load(open(p)) for p in sys.argv[2:]]
json.dump({'records': [r for p in parts for r in p['records']]}, open(sys.argv[1], 'w'))" "$out" "${parts[@]}"
    # every record is there: this loads the model, runs nothing, and writes the table, markdown and heatmaps
    # shellcheck disable=SC2046
    timeout $((CALL - SECONDS)) python3 -m headspace eval $(eval_args "$model" "$tokens" "$samples") \
        --settings inside,after --out "$out" --markdown "$RESULTS/eval_${model}_${name}.md" \
        --heatmap "$RESULTS/eval_${model}_${name}.png" >/dev/null 2>>"$PARTS/eval_${model}_${name}_report.log" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || missing=1; done
for run in "${RUNS[@]}"; do
    read -r model name tokens samples <<<"$run"
    out=$RESULTS/eval_${model}_${name}.json
    if done_json "$out"; then echo "written: $out, ${out%.json}.md, ${out%.json}.png, ${out%.json}_after.png"; fi
done
if [ "$missing" = 0 ]; then echo "all tables written"; else exit 3; fi
