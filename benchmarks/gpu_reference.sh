#!/usr/bin/env bash
# Reference runs on a lent GPU host (device tool), after the offline vLLM bundle is unpacked to
# /root/vllm-site (and llmcompressor's to /root/llmcompressor-site for `quantize`). Servers and
# quantization run detached (setsid), so they outlive the call that started them; results live in
# /root/results, outside the checkout (which the device tool re-sends each call).
#   bash benchmarks/gpu_reference.sh quantize NAME SHAPE SCHEME GPUS [pricing.quantize args...]
#        random-weight SHAPE model, then a real llmcompressor checkpoint at /root/checkpoints/NAME
#   bash benchmarks/gpu_reference.sh serve NAME MODEL SCHEME TP GPUS PORT [LABEL]   # start detached
#   bash benchmarks/gpu_reference.sh wait NAME...                                    # until /health
#   bash benchmarks/gpu_reference.sh sweep NAME PROFILE [bench args...]       # attach, sweep, resume
#   bash benchmarks/gpu_reference.sh parallel "NAME PROFILE [args]" "NAME ..." # sweeps side by side
#   bash benchmarks/gpu_reference.sh long NAME PROFILE RATE... [-- bench args...]  # one open-loop probe
#        per rate, each in its own file (in one file a rate search would take the others as its own)
#   bash benchmarks/gpu_reference.sh peer NAME ISL OSL CONCURRENCY PROMPTS    # vllm bench serve
#   bash benchmarks/gpu_reference.sh peercheck NAME ISL OSL CONCURRENCY [peer_check args...]
#        ours (token ids, text) then vllm bench, compared (benchmarks/peer_check.py)
#   bash benchmarks/gpu_reference.sh bg JOB COMMAND [ARGS...]   # any command above, detached, from a copy
#        under /root (the device tool lays the checkout afresh every call); its output in /root/JOB.txt
#   bash benchmarks/gpu_reference.sh poll JOB SECONDS         # wait up to SECONDS for JOB, show its tail
#   bash benchmarks/gpu_reference.sh stop NAME...
#   bash benchmarks/gpu_reference.sh collect                 # results + logs -> $OUT/results.tgz
set -euo pipefail
export PYTHONPATH=/root/vllm-site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
STATE=/root/servers RESULTS=/root/results
MAX_MODEL_LEN=${MAX_MODEL_LEN:-8192}
mkdir -p "$STATE" "$RESULTS" /root/models /root/checkpoints
cmd=$1; shift
# The device tool gives a host back after 30 s idle; the next call then lands on a fresh one.
if [[ $cmd =~ ^(serve|sweep|long|peer|peercheck|parallel)$ && ! -d /root/vllm-site ]]; then
    echo "no /root/vllm-site: this is a fresh host (the last was given back); unpack the bundle again" >&2; exit 3
fi

case "$cmd" in
quantize)
    name=$1 shape=$2 scheme=$3 gpus=$4; shift 4
    snap=/root/snap-$name  # a copy of the code: the checkout may be replaced while this runs
    rm -rf "$snap"; mkdir -p "$snap"; cp -r pricing benchmarks quant_recipes "$snap/"
    cd "$snap"
    # llmcompressor's own site, never beside vllm-site: their compressed-tensors differ.
    CUDA_VISIBLE_DEVICES=$gpus PYTHONPATH=/root/llmcompressor-site:$snap setsid nohup bash -c \
        "python3 benchmarks/random_model.py $shape /root/models/$shape-random && \
         python3 -m pricing.quantize --model /root/models/$shape-random --scheme $scheme -o /root/checkpoints/$name $*" \
        > "/root/$name-quant.log" 2>&1 &
    ;;
serve)
    name=$1 model=$2 scheme=$3 tp=$4 gpus=$5 port=$6 label=${7:-$(basename "$2")}
    read -r dir load_format < <(python3 -c "from pathlib import Path; from pricing.serving.prepare import prepare_model; \
r = prepare_model('$model', '$scheme', Path('/root/models')); print(r.model, r.load_format)")
    printf '%s\n' "$label" "$scheme" "$tp" "$gpus" "$port" "$dir" > "$STATE/$name.conf"
    CUDA_VISIBLE_DEVICES=$gpus setsid nohup python3 -m vllm.entrypoints.openai.api_server --model "$dir" \
        --load-format "$load_format" --tensor-parallel-size "$tp" --port "$port" --max-model-len "$MAX_MODEL_LEN" \
        --served-model-name "$label" > "/root/$name.log" 2>&1 &
    echo $! > "$STATE/$name.pid"
    ;;
wait)
    for name in "$@"; do
        port=$(sed -n 5p "$STATE/$name.conf")
        for _ in $(seq 1 300); do
            python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null \
                && { echo "$name healthy after ${SECONDS}s"; break; }
            kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null || { echo "$name died"; tail -30 "/root/$name.log"; exit 1; }
            sleep 1
        done
    done
    ;;
sweep)
    name=$1 profile=$2; shift 2
    mapfile -t c < "$STATE/$name.conf"  # model scheme tp gpus port dir
    exec env CUDA_VISIBLE_DEVICES=${c[3]} python3 -m pricing.bench --url "http://127.0.0.1:${c[4]}" --model "${c[0]}" \
        --scheme "${c[1]}" --tp "${c[2]}" --profile "$profile" --max-model-len "$MAX_MODEL_LEN" --tokenizer "${c[5]}" \
        --out "$RESULTS/${c[0]}_$(python3 -c 'from pricing.serving.prepare import detect_gpu; print(detect_gpu())').jsonl" "$@"
    ;;
parallel)  # one sweep per argument, each on its own server; logs in /root/sweep-N.txt
    pids=()
    for i in $(seq 1 $#); do
        # shellcheck disable=SC2086  # each argument is a word list on purpose
        bash "$0" sweep ${!i} > "/root/sweep-$i.txt" 2>&1 & pids+=($!)
    done
    status=0
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || status=$?
        grep -E "^#|stopped" "/root/sweep-$((i + 1)).txt" || tail -5 "/root/sweep-$((i + 1)).txt"
    done
    exit $status
    ;;
long)
    name=$1 profile=$2; shift 2
    rates=()
    while [[ $# -gt 0 && $1 != -- ]]; do rates+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    for rate in "${rates[@]}"; do
        bash "$0" sweep "$name" "$profile" --mode open --start "$rate" --max-probes 1 --no-prefill \
            --out "$RESULTS/long_${name}_${rate}.jsonl" "$@" || echo "probe at $rate req/s: exit $?"
    done
    ;;
peer)
    name=$1 isl=$2 osl=$3 conc=$4 prompts=$5
    mapfile -t c < "$STATE/$name.conf"
    exec python3 -m vllm.entrypoints.cli.main bench serve --backend vllm --base-url "http://127.0.0.1:${c[4]}" \
        --model "${c[0]}" --tokenizer "${c[5]}" --dataset-name random --random-input-len "$isl" \
        --random-output-len "$osl" --ignore-eos --max-concurrency "$conc" --num-prompts "$prompts" \
        --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 --save-result --save-detailed \
        --result-dir "$RESULTS" --result-filename "peer_vllm_bench_${name}_c${conc}.json"
    ;;
peercheck)
    name=$1 isl=$2 osl=$3 conc=$4; shift 4
    mapfile -t c < "$STATE/$name.conf"
    exec python3 benchmarks/peer_check.py --url "http://127.0.0.1:${c[4]}" --model "${c[0]}" --tokenizer "${c[5]}" \
        --isl "$isl" --osl "$osl" --concurrency "$conc" --json "$RESULTS/peer_check_${name}_c${conc}.json" "$@"
    ;;
bg)
    job=$1; shift
    snap=/root/snap-$job
    rm -rf "$snap"; mkdir -p "$snap"; cp -r pricing benchmarks profiles quant_recipes "$snap/"
    quoted=$(printf '%q ' "$@")  # keeps each argument whole ("NAME PROFILE args" for parallel)
    (cd "$snap" && setsid nohup bash -c "bash benchmarks/gpu_reference.sh $quoted; echo \$? > /root/$job.done" \
        > "/root/$job.txt" 2>&1 &)
    echo "started $job"
    ;;
poll)
    job=$1 limit=$2
    for _ in $(seq 1 "$limit"); do [ -f "/root/$job.done" ] && break; sleep 1; done
    # (a job that has written nothing yet leaves grep without a line: not a failure)
    tail -c 3000 "/root/$job.txt" | tr '\r' '\n' | { grep -v "^\s*$" || true; } | tail -25
    [ -f "/root/$job.done" ] && echo "$job finished: exit $(cat "/root/$job.done")" || echo "$job still running"
    ;;
stop)
    for name in "$@"; do kill -TERM -- "-$(cat "$STATE/$name.pid")" 2>/dev/null || true; done
    sleep 10
    for name in "$@"; do kill -KILL -- "-$(cat "$STATE/$name.pid")" 2>/dev/null || true; done
    ;;
collect)
    tar czf "${OUT:?}/results.tgz" -C /root results $(cd /root && ls ./*.log ./*.txt 2>/dev/null)
    ;;
*)
    echo "unknown command $cmd" >&2; exit 2 ;;
esac
