#!/usr/bin/env bash
# Side-by-side frontend latency: two builds of tandem (e.g. the commit before a change and this
# tree), each serving a mocker worker without delay, measured in alternating rounds with
# scripts/bench-frontend.py against the same NATS and etcd, so machine noise hits both alike.
#
#   git worktree add /tmp/base <rev> && (cd /tmp/base && cargo build --bins)
#   scripts/bench-frontend-ab.sh /tmp/base/target/debug target/debug [rounds]
#
# Prints one JSON line per (round, build, max_tokens).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
a=$1 b=$2 rounds=${3:-5}
bin=$root/.tools/bin run=$(mktemp -d)
model=$root/models/SmolLM2-135M-Instruct.Q4_1.gguf
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nats=$(port) etcd=$(port) peer=$(port) http=$(port)
"$bin/nats-server" -a 127.0.0.1 -p "$nats" >"$run/nats.log" 2>&1 & pids=($!)
"$bin/etcd" --data-dir "$run/etcd" --listen-client-urls "http://127.0.0.1:$etcd" \
  --advertise-client-urls "http://127.0.0.1:$etcd" --listen-peer-urls "http://127.0.0.1:$peer" \
  >"$run/etcd.log" 2>&1 & pids+=($!)
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$run"' EXIT
export NATS_SERVER=nats://127.0.0.1:$nats ETCD_ENDPOINTS=http://127.0.0.1:$etcd
for round in $(seq 1 "$rounds"); do
  for build in "$a" "$b"; do
    "$build/worker" --model-path "$model" --model-name SmolLM2-135M-Instruct --engine mocker \
      --speedup-ratio 0 >"$run/worker.log" 2>&1 & w=$!
    "$build/frontend" --http-host 127.0.0.1 --http-port "$http" >"$run/frontend.log" 2>&1 & f=$!
    for _ in $(seq 1 200); do
      curl -s "127.0.0.1:$http/v1/models" | grep -q SmolLM2 && break
      sleep 0.2
    done
    for mt in 8 64; do
      echo "{\"round\": $round, \"build\": \"$build\", \"result\": $(python3 "$root/scripts/bench-frontend.py" \
        --url "http://127.0.0.1:$http" --requests 300 --max-tokens "$mt")}"
    done
    kill "$f" "$w"; wait "$f" "$w" 2>/dev/null || true
  done
done
