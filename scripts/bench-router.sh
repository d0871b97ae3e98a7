#!/usr/bin/env bash
# End-to-end router benchmark: 4 mocker workers at real speed (Dynamo's timing model, no
# speed-up; 8192 blocks of 16 tokens each, context 32k) behind one frontend, the multi-turn
# long-shared-prompt workload of scripts/bench-router.py, once with --router-mode kv and once
# with round-robin (fresh workers each time, so both start with empty caches). Release build:
# a debug frontend spends ~100 ms tokenizing and hashing a 15k-token prompt, which would hide
# what routing changes.
#   [FRONTEND_ARGS=...] [KV_BLOCKS=...] scripts/bench-router.sh [extra bench-router.py flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
cargo build --quiet --release --bins
target=target/release
bin="$root/.tools/bin"
run="$root/.tools/run/bench-router"
rm -rf "$run"; mkdir -p "$run"
NATS_PORT=${NATS_PORT:-4322} ETCD_PORT=${ETCD_PORT:-2479} HTTP_PORT=${HTTP_PORT:-8010}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$bin/nats-server" -a 127.0.0.1 -p "$NATS_PORT" >"$run/nats.log" 2>&1 & pids+=($!)
"$bin/etcd" --data-dir "$run/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:2490" \
  --initial-advertise-peer-urls "http://127.0.0.1:2490" --initial-cluster "default=http://127.0.0.1:2490" \
  --log-level warn >"$run/etcd.log" 2>&1 & pids+=($!)
export NATS_SERVER="nats://127.0.0.1:$NATS_PORT" ETCD_ENDPOINTS="http://127.0.0.1:$ETCD_PORT" DYN_LEASE_TTL_SECS=2

bench() {
  local mode=$1; shift
  local stage=()
  for i in 0 1 2 3; do
    "$target/worker" --model-path "$model" --engine mocker --speedup-ratio 1 --block-size 16 --kv-cache-blocks "${KV_BLOCKS:-8192}" --context-length 32768 \
      >"$run/worker-$mode-$i.log" 2>&1 & stage+=($!)
  done
  "$target/frontend" --http-host 127.0.0.1 --http-port "$HTTP_PORT" --router-mode "$mode" ${FRONTEND_ARGS:-} \
    >"$run/frontend-$mode.log" 2>&1 & stage+=($!)
  for _ in $(seq 1 300); do
    n=$(curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null \
      | awk '/^dynamo_frontend_model_workers/ {print $2}' || true)
    [ "${n:-0}" = "4" ] && break
    sleep 0.2
  done
  printf '%-12s ' "$mode"
  python3 scripts/bench-router.py --url "http://127.0.0.1:$HTTP_PORT" "$@"
  for p in "${stage[@]}"; do kill "$p"; done
  wait "${stage[@]}" 2>/dev/null || true
  # Let the stopped workers' leases go before the next round registers new ones.
  sleep 3
}

bench kv "$@"
bench round-robin "$@"
