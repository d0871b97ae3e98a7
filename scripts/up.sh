#!/usr/bin/env bash
# Starts a local tandem stack: nats-server and etcd on their standard ports (4222, 2379),
# unless something already answers there. Ctrl-C stops what this script started.
# Logs and etcd data go to .tools/run/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
bin="$root/.tools/bin"
run="$root/.tools/run"
mkdir -p "$run"

NATS_PORT=${NATS_PORT:-4222}
ETCD_PORT=${ETCD_PORT:-2379}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  echo "nothing answers on port $1; see $run/*.log" >&2; exit 1
}

if port_open "$NATS_PORT"; then
  echo "NATS already running on :$NATS_PORT"
else
  "$bin/nats-server" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$run/jetstream" -m 8222 >"$run/nats.log" 2>&1 &
  pids+=($!)
  wait_port "$NATS_PORT"
  echo "started nats-server on :$NATS_PORT (monitoring :8222)"
fi
if port_open "$ETCD_PORT"; then
  echo "etcd already running on :$ETCD_PORT"
else
  "$bin/etcd" --data-dir "$run/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:2380" --initial-advertise-peer-urls "http://127.0.0.1:2380" \
    --initial-cluster "default=http://127.0.0.1:2380" --log-level warn >"$run/etcd.log" 2>&1 &
  pids+=($!)
  wait_port "$ETCD_PORT"
  echo "started etcd on :$ETCD_PORT"
fi

export NATS_SERVER="nats://127.0.0.1:$NATS_PORT" ETCD_ENDPOINTS="http://127.0.0.1:$ETCD_PORT"
echo "NATS_SERVER=$NATS_SERVER ETCD_ENDPOINTS=$ETCD_ENDPOINTS"
if [ "${#pids[@]}" -gt 0 ]; then
  echo "Ctrl-C to stop."
  wait
fi
