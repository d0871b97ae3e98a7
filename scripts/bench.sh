#!/usr/bin/env bash
# The benchmark suite, with aiperf (NVIDIA's benchmark client, from PyPI) as Dynamo's users run
# it: streamed chat at each concurrency of a sweep, synthetic prompts of fixed length and a
# shared-prefix workload, against a stack this script starts (NATS, etcd, frontend with the KV
# router, one worker); with --peer dynamo, the same workloads against NVIDIA Dynamo 1.6.1 from
# PyPI (frontend + mocker on the same NATS and etcd), back to back on this machine.
#
#   scripts/bench.sh [--peer dynamo] [--engine mocker|candle] [--concurrency "1 8 32 64 256"]
#                    [--requests N] [--isl N] [--osl N] [--speedup R] [--workloads "synthetic shared-prefix"]
#                    [--out DIR] [--tiny] [--no-report]
#
# --engine: tandem's worker (mocker: Dynamo's timing model divided by --speedup, default 100 so
#   that the serving path, not the simulated model, is what is measured; candle: the real model
#   on the CPU, no peer). --tiny: one small run per workload (what the test runs).
# Writes aiperf's JSON and CSV per run under OUT/raw/ (default docs/bench), then
# scripts/bench_report.py: PNG plots (TTFT, ITL, throughput vs concurrency) and summary.md,
# which it also puts into docs/benchmarks.md between the "aiperf suite" markers (not with
# --tiny or --out elsewhere). Binaries: target/release (built here), or TANDEM_TARGET=debug
# (already built: the tests use it). Ports: NATS_PORT, ETCD_PORT, ETCD_PEER_PORT, HTTP_PORT,
# SYSTEM_PORT.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

peer="" engine=mocker concurrency="1 8 32 64 256" requests=0 isl=128 osl=64 speedup=100
workloads="synthetic shared-prefix" out="$root/docs/bench" tiny=0 report=1
while [ $# -gt 0 ]; do
  case "$1" in
    --peer) peer=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --isl) isl=$2; shift 2 ;;
    --osl) osl=$2; shift 2 ;;
    --speedup) speedup=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --no-report) report=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$peer" in ""|dynamo) ;; *) echo "--peer: only dynamo" >&2; exit 2 ;; esac
if [ "$peer" = dynamo ] && [ "${SYSTEM_PORT:-18081}" -gt 32767 ]; then
  echo "SYSTEM_PORT=$SYSTEM_PORT: Dynamo 1.6.1 reads DYN_SYSTEM_PORT as a signed 16-bit number; use one below 32768" >&2
  exit 2
fi
case "$engine" in mocker|candle) ;; *) echo "--engine: mocker or candle" >&2; exit 2 ;; esac
if [ "$engine" = candle ] && [ -n "$peer" ]; then
  echo "--peer dynamo needs --engine mocker (Dynamo's engines need a GPU; its mocker is the peer)" >&2; exit 2
fi
if [ "$tiny" = 1 ]; then concurrency="2"; requests=6; isl=32; osl=8; fi

step() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
venv="$root/.bench/venv-aiperf"
if [ ! -x "$venv/bin/aiperf" ]; then
  step "installing aiperf into $venv (once)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "aiperf==0.13.0" "matplotlib==3.11.2"
fi
target="$root/target/${TANDEM_TARGET:-release}"
if [ "${TANDEM_TARGET:-release}" = release ]; then
  step "building tandem (release)"
  cargo build --release --bins --examples -p frontend -p worker -p tandem-model
fi
for b in frontend worker; do
  [ -x "$target/$b" ] || { echo "$target/$b missing: cargo build --workspace --bins --examples" >&2; exit 1; }
done
# shellcheck source=scripts/lib/dynamo.sh
source "$root/scripts/lib/dynamo.sh"
tokenizer_dir "$target" "$model"
hf=$DYNAMO_HF

run="$root/.tools/run/bench"
rm -rf "$run"; mkdir -p "$run" "$out/raw"
bin="$root/.tools/bin"
NATS_PORT=${NATS_PORT:-4332} ETCD_PORT=${ETCD_PORT:-2489} HTTP_PORT=${HTTP_PORT:-8020}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-$((ETCD_PORT + 1))}
# Dynamo 1.6.1 reads DYN_SYSTEM_PORT as a signed 16-bit number: keep it below 32768.
SYSTEM_PORT=${SYSTEM_PORT:-18081}
MODEL_NAME=SmolLM2-135M-Instruct
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop_all EXIT

infra() {
  "$bin/nats-server" -a 127.0.0.1 -p "$NATS_PORT" >"$run/nats-$1.log" 2>&1 & pids+=($!)
  "$bin/etcd" --data-dir "$run/etcd-$1" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn >"$run/etcd-$1.log" 2>&1 & pids+=($!)
  export NATS_SERVER="nats://127.0.0.1:$NATS_PORT" ETCD_ENDPOINTS="http://127.0.0.1:$ETCD_PORT"
}

# Waits until the frontend lists the model and answers a chat completion (the first request
# also warms tokenizer and template caches on either side); stops at once, showing its log,
# when a process it started has exited.
ready() {
  local log=$1
  for _ in $(seq 1 600); do
    for p in "${pids[@]}"; do
      if ! kill -0 "$p" 2>/dev/null; then
        echo "a process of the stack exited; last lines of its logs:" >&2
        for f in "$run"/*.log; do echo "== $f" >&2; tail -5 "$f" >&2; done
        exit 1
      fi
    done
    if curl -fs "http://127.0.0.1:$HTTP_PORT/v1/chat/completions" -H 'Content-Type: application/json' \
        -d "{\"model\":\"$MODEL_NAME\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2}" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  echo "the stack did not answer; last lines of $log:" >&2; tail -20 "$log" >&2; exit 1
}

start_tandem() {
  infra tandem
  local wargs=(--model-path "$model" --model-name "$MODEL_NAME")
  if [ "$engine" = mocker ]; then wargs+=(--engine mocker --speedup-ratio "$speedup"); fi
  DYN_SYSTEM_PORT=$SYSTEM_PORT "$target/worker" "${wargs[@]}" >"$run/tandem-worker.log" 2>&1 & pids+=($!)
  "$target/frontend" --http-host 127.0.0.1 --http-port "$HTTP_PORT" --router-mode kv \
    >"$run/tandem-frontend.log" 2>&1 & pids+=($!)
  ready "$run/tandem-frontend.log"
}

start_dynamo() {
  install_dynamo
  infra dynamo
  DYN_SYSTEM_ENABLED=true DYN_SYSTEM_PORT=$SYSTEM_PORT "$DYNAMO_PY" -m dynamo.mocker \
    --model-path "$hf" --model-name "$MODEL_NAME" --speedup-ratio "$speedup" \
    >"$run/dynamo-mocker.log" 2>&1 & pids+=($!)
  "$DYNAMO_PY" -m dynamo.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" --router-mode kv \
    >"$run/dynamo-frontend.log" 2>&1 & pids+=($!)
  ready "$run/dynamo-frontend.log"
}

# aiperf against whatever answers on HTTP_PORT: one run per workload and concurrency.
sweep() {
  local side=$1 total=$2 n=0
  for w in $workloads; do
    for c in $concurrency; do
      n=$((n + 1))
      local reqs=$requests
      [ "$reqs" = 0 ] && reqs=$(( c * 8 > 200 ? c * 8 : 200 ))
      local dir="$out/raw/$side-$engine-$w-c$c"
      rm -rf "$dir"
      local extra=()
      if [ "$w" = shared-prefix ]; then
        # Four 512-token prefixes shared by every request, each followed by its own ISL tokens.
        extra=(--prompt-prefix-pool-size 4 --prompt-prefix-length $(( tiny == 1 ? 64 : 512 )))
      fi
      step "[$n/$total] $side $engine $w concurrency $c, $reqs requests"
      "$venv/bin/aiperf" profile --model "$MODEL_NAME" --url "http://127.0.0.1:$HTTP_PORT" \
        --endpoint-type chat --streaming --concurrency "$c" --request-count "$reqs" \
        --warmup-request-count "$(( c < 8 ? 8 : c ))" \
        --prompt-input-tokens-mean "$isl" --prompt-input-tokens-stddev 0 \
        --prompt-output-tokens-mean "$osl" --prompt-output-tokens-stddev 0 \
        --extra-inputs ignore_eos:true --tokenizer "$hf" --random-seed 7 \
        --ui-type none --export-level summary --output-artifact-dir "$dir" "${extra[@]}" \
        >"$run/aiperf-$side-$w-c$c.log" 2>&1 || {
          echo "aiperf failed; last lines of $run/aiperf-$side-$w-c$c.log:" >&2
          tail -20 "$run/aiperf-$side-$w-c$c.log" >&2; exit 1; }
      # Keep aiperf's summaries (JSON, CSV, console table); the inputs, per-request records
      # and server-metric series are megabytes a run.
      find "$dir" -mindepth 1 -maxdepth 1 ! -name 'profile_export_aiperf.*' ! -name 'profile_export_console.txt' \
        -exec rm -rf {} +
    done
  done
}

runs=$(( $(wc -w <<<"$workloads") * $(wc -w <<<"$concurrency") ))
step "tandem: frontend + $engine worker"
start_tandem
sweep tandem "$runs"
stop_all
if [ "$peer" = dynamo ]; then
  step "Dynamo 1.6.1: frontend + mocker"
  start_dynamo
  sweep dynamo "$runs"
  stop_all
fi
{
  echo "machine: $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "command: scripts/bench.sh ${peer:+--peer $peer }--engine $engine --concurrency \"$concurrency\" --isl $isl --osl $osl --speedup $speedup --workloads \"$workloads\""
  echo "tandem: frontend --router-mode kv; worker --engine $engine${speedup:+ --speedup-ratio $speedup} (${TANDEM_TARGET:-release} build)"
  [ "$peer" = dynamo ] && echo "dynamo: python -m dynamo.frontend --router-mode kv; python -m dynamo.mocker --model-path <tokenizer dir> --speedup-ratio $speedup (ai-dynamo 1.6.1)"
  echo "aiperf: 0.13.0, streaming chat, ignore_eos, prompt stddev 0, warm-up max(8, concurrency) requests"
} >"$out/raw/meta.txt"
if [ "$report" = 1 ]; then
  step "report"
  update=()
  [ "$tiny" = 0 ] && [ "$out" = "$root/docs/bench" ] && update=(--update "$root/docs/benchmarks.md")
  "$venv/bin/python" scripts/bench_report.py "$out" "${update[@]}"
fi
step "done: $out"
