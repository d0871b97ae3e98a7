#!/usr/bin/env bash
# End-to-end router benchmark: 4 mocker workers at real speed (Dynamo's timing model, no
# speed-up; blocks of 16 tokens, context 32k) behind one frontend, the multi-turn
# long-shared-prompt workload of scripts/bench-router.py, once with --router-mode kv and once
# with round-robin, in two cache regimes; with --peer dynamo, the same against NVIDIA Dynamo
# 1.6.1 (python -m dynamo.frontend + python -m dynamo.mocker --num-workers 4, same block size,
# blocks per worker and context), back to back on this machine.
#
#   scripts/bench-router.sh [--peer dynamo] [--regimes "partial plentiful"] [--tiny]
#                           [--out DIR] [--no-build] [--no-report] [extra bench-router.py flags]
#
# Regimes (KV blocks per worker; the workload is the same in both):
#   partial    the system prompts together are ~2.5x one worker's cache but fit in the four
#              caches together: which worker a conversation lands on decides whether it hits;
#   plentiful  one worker's cache holds every prompt and history: only first visits miss.
# Workload: 16 system prompts of 10 000 words (~10.4 k tokens each with this tokenizer, ~1.03
#   tokens a word), 64 conversations x 4 turns, 12 concurrent clients, output lengths drawn
#   around 16 tokens (normal, standard deviation 6; --max-tokens-stddev 0 for exactly 16, where
#   clients whose turns were decoded together come back together: docs/benchmarks.md);
#   partial 4096 blocks (65 536 tokens) per worker, plentiful 16 384. --tiny: 8 prompts of 400
#   words, 16 conversations x 2 turns, 4 clients, 88 / 512 blocks (a smoke test, ~1 min a side).
#   Extra flags go to bench-router.py after these, so they win (e.g. --concurrency 24, or
#   --think-ms 1000: clients pause between turns, docs/benchmarks.md).
# Every run (regime x side x router) gets fresh NATS, etcd, workers and frontend, so caches start
# empty and no lease or KV event of an earlier run is left. Writes each run's JSON line to
# OUT/raw/<regime>-<side>-<router>.json (OUT: docs/bench/router, or .tools/run/bench-router/out
# with --tiny), then scripts/bench_router_report.py: OUT/summary.md and, for a full run into
# docs/bench/router, the table between the "router regimes" markers of docs/benchmarks.md.
# Release build (a debug frontend spends ~100 ms tokenizing and hashing a 15 k-token prompt,
# which would hide what routing changes); --no-build uses target/release as it is;
# TANDEM_TARGET=debug uses target/debug as it is (the smoke test, with --tiny). Each run's logs
# go to BENCH_ROUTER_LOGS (default .tools/run/bench-router), emptied first.
# tandem's mockers send a step's tokens when its simulated time has passed (--token-timing
# after-step, a forward pass's tokens); Dynamo 1.6.1's mocker sends them between the step's
# prefill time and its decode pass's, one decode pass sooner. With --peer dynamo, tandem's run
# with --token-timing after-prefill, so both sides time tokens alike and the TTFTs compare
# routers and frontends; TOKEN_TIMING=after-step|after-prefill overrides either default.
# Knobs: PARTIAL_BLOCKS, PLENTIFUL_BLOCKS, FRONTEND_ARGS (tandem's frontend),
# DYNAMO_FRONTEND_ARGS; ports NATS_PORT, ETCD_PORT, ETCD_PEER_PORT, HTTP_PORT.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

peer="" regimes="partial plentiful" tiny=0 build=1 report=1 out="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --peer) peer=$2; shift 2 ;;
    --regimes) regimes=$2; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --out) out=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --no-report) report=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) extra+=("$1"); shift ;;
  esac
done
case "$peer" in ""|dynamo) ;; *) echo "--peer: only dynamo" >&2; exit 2 ;; esac
token_timing=${TOKEN_TIMING:-$([ "$peer" = dynamo ] && echo after-prefill || echo after-step)}
case "$token_timing" in after-step|after-prefill) ;; *) echo "TOKEN_TIMING: after-step or after-prefill, not $token_timing" >&2; exit 2 ;; esac
for g in $regimes; do
  case "$g" in partial|plentiful) ;; *) echo "--regimes: partial and/or plentiful, not $g" >&2; exit 2 ;; esac
done
if [ "$tiny" = 1 ]; then
  workload=(--system-prompts 8 --system-words 400 --conversations 16 --turns 2 --concurrency 4 --max-tokens 16)
  # A prompt's ~30 blocks: two requests on one worker still fit in the partial cache.
  declare -A blocks=([partial]=${PARTIAL_BLOCKS:-88} [plentiful]=${PLENTIFUL_BLOCKS:-512})
else
  workload=(--system-prompts 16 --system-words 10000 --conversations 64 --turns 4 --concurrency 12 --max-tokens 16 --max-tokens-stddev 6)
  declare -A blocks=([partial]=${PARTIAL_BLOCKS:-4096} [plentiful]=${PLENTIFUL_BLOCKS:-16384})
fi
default_out="$root/docs/bench/router"
[ "$tiny" = 1 ] && default_out="$root/.tools/run/bench-router/out"
out=${out:-$default_out}
BLOCK_SIZE=16 WORKERS=4 CONTEXT=32768 MODEL_NAME=SmolLM2-135M-Instruct
NATS_PORT=${NATS_PORT:-4322} ETCD_PORT=${ETCD_PORT:-2479} HTTP_PORT=${HTTP_PORT:-8010}
# Dynamo 1.6.1 reads DYN_SYSTEM_PORT as a signed 16-bit number; keep every port below 32768. (Its
# mockers' system server stays off, as by default: with --num-workers 4 each of the four would
# try to bind the same port, and nothing here reads it.)
for p in "$NATS_PORT" "$ETCD_PORT" "${ETCD_PEER_PORT:-$((ETCD_PORT + 1))}" "$HTTP_PORT"; do
  [ "$p" -lt 32768 ] || { echo "port $p: keep ports below 32768 (the rule here since Dynamo 1.6.1 reads DYN_SYSTEM_PORT as a signed 16-bit number)" >&2; exit 2; }
done

started=$SECONDS
step() { printf '[bench-router %s +%dm%02ds] %s\n' "$(date +%H:%M:%S)" $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)) "$*"; }

bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
target="$root/target/${TANDEM_TARGET:-release}"
bin="$root/.tools/bin"
# shellcheck source=scripts/lib/dynamo.sh
source "$root/scripts/lib/dynamo.sh"
if [ "$build" = 1 ] && [ "${TANDEM_TARGET:-release}" = release ]; then
  step "building tandem (release)"
  cargo build --quiet --release --bins
  if [ "$peer" = dynamo ] && [ ! -s "$DYNAMO_HF/tokenizer.json" ]; then
    cargo build --quiet --release -p tandem-model --example hf_dir
  fi
fi
for b in frontend worker; do
  [ -x "$target/$b" ] || { echo "$target/$b missing: cargo build --bins$([ "${TANDEM_TARGET:-release}" = release ] && echo " --release")" >&2; exit 1; }
done
if [ "$peer" = dynamo ]; then
  install_dynamo
  tokenizer_dir "$target" "$model"
fi

logs=${BENCH_ROUTER_LOGS:-$root/.tools/run/bench-router}
rm -rf "$logs"; mkdir -p "$logs" "$out/raw"
rm -f "$out"/raw/*.json "$out/raw/meta.txt"
sides="tandem${peer:+ $peer}"
total=$(( $(wc -w <<<"$regimes") * $(wc -w <<<"$sides") * 2 ))

# show_logs DIR: the last lines of every log of one run (what failed is usually in one of them).
show_logs() {
  for f in "$1"/*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2; done
}

chat_ok() {
  curl -fs "http://127.0.0.1:$HTTP_PORT/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\":\"$MODEL_NAME\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2}" >/dev/null 2>&1
}

# How many workers the stack knows. tandem: the frontend's own gauge. Dynamo's frontend has no
# such gauge; its four mockers (one process) each put an instance key into etcd, which the
# frontend watches.
workers_seen() {
  if [ "$1" = tandem ]; then
    curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null \
      | awk '/^dynamo_frontend_model_workers/ {print $2}' || true
  else
    ETCDCTL_API=3 "$bin/etcdctl" --endpoints "$ETCD_ENDPOINTS" get --prefix --keys-only \
      v1/instances/dynamo/backend/generate/ 2>/dev/null | grep -c . || true
  fi
}

# wait_ready SIDE DIR: until all four workers are known and a chat completion comes back (it
# also warms tokenizer and template caches on either side); stops at once, with the logs, when
# a process of the run has exited.
wait_ready() {
  local side=$1 dir=$2
  for _ in $(seq 1 240); do
    for p in "${pids[@]}"; do
      if ! kill -0 "$p" 2>/dev/null; then
        echo "a process of the run exited; last lines of its logs:" >&2; show_logs "$dir"; exit 1
      fi
    done
    if [ "$(workers_seen "$side")" = "$WORKERS" ] && chat_ok; then return 0; fi
    sleep 0.5
  done
  echo "the stack was not ready after 120 s (workers seen: $(workers_seen "$side")); last lines of its logs:" >&2
  show_logs "$dir"; exit 1
}

start_tandem() { # MODE BLOCKS DIR
  local i
  for ((i = 0; i < WORKERS; i++)); do
    "$target/worker" --model-path "$model" --model-name "$MODEL_NAME" --engine mocker --speedup-ratio 1 \
      --token-timing "$token_timing" --block-size "$BLOCK_SIZE" --kv-cache-blocks "$2" --context-length "$CONTEXT" \
      >"$3/worker-$i.log" 2>&1 & pids+=($!)
  done
  # shellcheck disable=SC2086 # FRONTEND_ARGS is a list of flags
  "$target/frontend" --http-host 127.0.0.1 --http-port "$HTTP_PORT" --router-mode "$1" ${FRONTEND_ARGS:-} \
    >"$3/frontend.log" 2>&1 & pids+=($!)
}

start_dynamo() { # MODE BLOCKS DIR
  "$DYNAMO_PY" -m dynamo.mocker --model-path "$DYNAMO_HF" --model-name "$MODEL_NAME" \
    --num-workers "$WORKERS" --block-size "$BLOCK_SIZE" --num-gpu-blocks-override "$2" --speedup-ratio 1 \
    --max-model-len "$CONTEXT" >"$3/mocker.log" 2>&1 & pids+=($!)
  # shellcheck disable=SC2086 # DYNAMO_FRONTEND_ARGS is a list of flags
  "$DYNAMO_PY" -m dynamo.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" --router-mode "$1" \
    ${DYNAMO_FRONTEND_ARGS:-} >"$3/frontend.log" 2>&1 & pids+=($!)
}

# one_run N REGIME SIDE MODE: fresh NATS and etcd (scripts/lib/infra.sh, sourced again for each
# run with its own data directory), the side's workers and frontend, the client, then all of it
# stopped, newest first.
one_run() {
  local n=$1 regime=$2 side=$3 mode=$4 kv=${blocks[$2]}
  local dir="$logs/$regime-$side-$mode" json="$out/raw/$regime-$side-$mode.json"
  mkdir -p "$dir"
  step "[$n/$total] $regime $side $mode: $kv blocks of $BLOCK_SIZE per worker"
  run=$dir
  # shellcheck source=scripts/lib/infra.sh
  source "$root/scripts/lib/infra.sh" >"$dir/infra.log"
  "start_$side" "$mode" "$kv" "$dir"
  wait_ready "$side" "$dir"
  if ! python3 scripts/bench-router.py --url "http://127.0.0.1:$HTTP_PORT" --model "$MODEL_NAME" \
      "${workload[@]}" "${extra[@]}" --label "regime=$regime" --label "side=$side" --label "router=$mode" \
      --label "kv_blocks=$kv" --label "block_size=$BLOCK_SIZE" --label "workers=$WORKERS" \
      --trace "$dir/requests.jsonl" >"$json" 2>"$dir/client.log"; then
    echo "bench-router.py failed; last lines of the run's logs:" >&2; show_logs "$dir"; exit 1
  fi
  stop_since 0
  python3 - "$json" <<'PY' || { echo "the run gave no result; last lines of its logs:" >&2; show_logs "$dir"; exit 1; }
import json, sys
r = json.loads(open(sys.argv[1]).read())
t = r["ttft_ms"]
print(f"    TTFT p50 {t['p50']} ms, p99 {t['p99']} ms, mean {t['mean']} ms; latency p50 {r['latency_ms_p50']} ms, "
      f"ITL mean {r['itl_ms_mean']} ms; hit rate {r['prefix_hit_rate']} "
      f"(highest possible ~{r['max_hit_rate']}); {r['requests']} requests, {r['errors']} errors, {r['seconds']} s; "
      f"prompt ~{r['system_prompt_tokens']} tokens, working set ~{r['working_set_tokens']} tokens "
      f"= {r['working_set_tokens'] / (int(r['kv_blocks']) * int(r['block_size'])):.2f}x one worker's cache")
if r["requests"] == 0:
    sys.exit("no request completed")
if r["errors"]:
    print(f"    errors by kind: {r['error_kinds']}", file=sys.stderr)
PY
}

n=0
for regime in $regimes; do
  for side in $sides; do
    for mode in kv round-robin; do
      n=$((n + 1))
      one_run "$n" "$regime" "$side" "$mode"
    done
  done
done

{
  echo "machine: $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "command: ${TOKEN_TIMING:+TOKEN_TIMING=$TOKEN_TIMING }scripts/bench-router.sh ${peer:+--peer $peer }--regimes \"$regimes\"$([ "$tiny" = 1 ] && echo " --tiny")${extra[*]:+ ${extra[*]}}"
  echo "workload: python3 scripts/bench-router.py ${workload[*]}${extra[*]:+ ${extra[*]}} (streamed chat, temperature 0, every turn carrying the whole history)"
  echo "KV blocks per worker: $(for g in $regimes; do printf '%s %s, ' "$g" "${blocks[$g]}"; done | sed 's/, $//') (N below); fresh NATS, etcd, workers and frontend for every run"
  echo "tandem (${TANDEM_TARGET:-release} build): ${WORKERS}× worker --model-path <gguf> --engine mocker --speedup-ratio 1 --token-timing $token_timing --block-size $BLOCK_SIZE --kv-cache-blocks N --context-length $CONTEXT; frontend --router-mode kv|round-robin${FRONTEND_ARGS:+ $FRONTEND_ARGS}"
  [ "$peer" = dynamo ] && echo "Dynamo (ai-dynamo 1.6.1): python -m dynamo.mocker --model-path <tokenizer dir> --num-workers $WORKERS --block-size $BLOCK_SIZE --num-gpu-blocks-override N --speedup-ratio 1 --max-model-len $CONTEXT; python -m dynamo.frontend --router-mode kv|round-robin${DYNAMO_FRONTEND_ARGS:+ $DYNAMO_FRONTEND_ARGS}"
  true
} >"$out/raw/meta.txt"
if [ "$report" = 1 ]; then
  update=()
  [ "$tiny" = 0 ] && [ "$out" = "$root/docs/bench/router" ] && update=(--update "$root/docs/benchmarks.md")
  python3 scripts/bench_router_report.py "$out" "${update[@]}"
fi
step "done: $out"
