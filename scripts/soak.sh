#!/usr/bin/env bash
# Soak benchmark (not a test): CONCURRENCY (1000) streamed chats at once for DURATION (60) s
# against a frontend with two mocker workers at real speed (Dynamo's timing model), twice:
#   steady: nothing happens to the workers;
#   chaos:  worker 1 is killed (kill -9) and started again every KILL_EVERY (10) s, the
#           frontend running with --migration-limit 2.
# Per phase: the client's summary from scripts/soak.py (answers checked whole: status, no
# error event, [DONE], usage = max_tokens; errors by kind, p50/p99 latency, req/s), the
# frontend's RSS before and after, its migration counter, and whether every worker's KV
# blocks returned to 0 afterwards. Release binaries (`cargo build --release --bins` first;
# BIN_DIR overrides). Knobs: MAX_TOKENS (32), PHASES ("steady chaos"), NATS_PORT (14622),
# ETCD_PORT (14679), HTTP_PORT (18600).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
bin_dir=${BIN_DIR:-"$root/target/release"}
[ -x "$bin_dir/frontend" ] || { echo "build first: cargo build --release --bins" >&2; exit 1; }
bin="$root/.tools/bin"
run=$(mktemp -d /tmp/tandem-soak-XXXX)
CONCURRENCY=${CONCURRENCY:-1000}
DURATION=${DURATION:-60}
MAX_TOKENS=${MAX_TOKENS:-32}
KILL_EVERY=${KILL_EVERY:-10}
read -r -a phases <<<"${PHASES:-steady chaos}"
NATS_PORT=${NATS_PORT:-14622}
ETCD_PORT=${ETCD_PORT:-14679}
HTTP_PORT=${HTTP_PORT:-18600}
# shellcheck source=scripts/lib/infra.sh
source "$root/scripts/lib/infra.sh"
export DYN_LEASE_TTL_SECS=2
ulimit -n "$(ulimit -Hn)"
sys_port() { echo $((HTTP_PORT + 10 + $1)); }

start_worker() { # INDEX; sets worker_pid
  DYN_SYSTEM_PORT=$(sys_port "$1") DYN_SYSTEM_HOST=127.0.0.1 "$bin_dir/worker" \
    --model-path "$model" --engine mocker --speedup-ratio 1 >>"$run/worker$1.log" 2>&1 &
  worker_pid=$!
  pids+=($worker_pid)
}
metric() { # URL NAME: the sum of NAME's samples (0 when absent)
  curl -fs "$1" 2>/dev/null | awk -v n="$2" '$1 ~ "^"n"({|$)" {s += $2} END {print s + 0}'
}
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
wait_workers() { # N
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null |
      grep -q "^dynamo_frontend_model_workers{model=\"SmolLM2-135M-Instruct\"} $1$" && return 0
    sleep 0.2
  done
  echo "workers not ready; see $run" >&2; exit 1
}

for phase in "${phases[@]}"; do
  n=${#pids[@]}
  start_worker 0; start_worker 1; w1=$worker_pid
  args=()
  [ "$phase" = chaos ] && args=(--migration-limit 2)
  "$bin_dir/frontend" --http-host 127.0.0.1 --http-port "$HTTP_PORT" "${args[@]}" \
    >"$run/frontend-$phase.log" 2>&1 &
  pids+=($!); frontend=$!
  wait_workers 2
  # Warm-up, so that RSS "before" is the frontend's working size, not its start-up size.
  python3 scripts/soak.py --url "http://127.0.0.1:$HTTP_PORT" --concurrency 50 --duration 3 \
    --max-tokens "$MAX_TOKENS" >/dev/null
  rss_before=$(rss_mb "$frontend")
  chaos_pid=
  if [ "$phase" = chaos ]; then
    (
      while sleep "$KILL_EVERY"; do
        kill -9 "$(cat "$run/w1.pid")" 2>/dev/null || true
        sleep 1
        DYN_SYSTEM_PORT=$(sys_port 1) DYN_SYSTEM_HOST=127.0.0.1 "$bin_dir/worker" \
          --model-path "$model" --engine mocker --speedup-ratio 1 >>"$run/worker1.log" 2>&1 &
        echo $! >"$run/w1.pid"
      done
    ) &
    echo "$w1" >"$run/w1.pid"
    chaos_pid=$!
  fi
  summary=$(python3 scripts/soak.py --url "http://127.0.0.1:$HTTP_PORT" \
    --concurrency "$CONCURRENCY" --duration "$DURATION" --max-tokens "$MAX_TOKENS")
  if [ -n "$chaos_pid" ]; then
    kill "$chaos_pid" 2>/dev/null || true
    wait "$chaos_pid" 2>/dev/null || true
    pids+=("$(cat "$run/w1.pid")")
    wait_workers 2
  fi
  rss_after=$(rss_mb "$frontend")
  moved=$(metric "http://127.0.0.1:$HTTP_PORT/metrics" dynamo_frontend_model_migration_total)
  blocks=unknown
  for _ in $(seq 1 100); do
    b0=$(metric "http://127.0.0.1:$(sys_port 0)/metrics" dynamo_component_kvstats_active_blocks)
    b1=$(metric "http://127.0.0.1:$(sys_port 1)/metrics" dynamo_component_kvstats_active_blocks)
    if [ "$b0" = 0 ] && [ "$b1" = 0 ]; then blocks=0; break; fi
    blocks="$b0+$b1"
    sleep 0.2
  done
  echo "{\"phase\": \"$phase\", \"client\": $summary, \"frontend_rss_mb\": {\"before\": $rss_before, \"after\": $rss_after}, \"migrations\": $moved, \"kv_blocks_after\": \"$blocks\"}"
  stop_since "$n"
  sleep 3 # the leases of this phase's cards expire before the next phase registers
done
