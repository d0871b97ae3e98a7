#!/usr/bin/env bash
# Before/after for the frontend's throughput under load: two builds of tandem (directories
# holding `frontend` and `worker`), each serving an instant mocker (--speedup-ratio 0) behind
# --router-mode kv, measured in alternating rounds with wrk (keep-alive, streamed chat of 16
# tokens, ignore_eos) at concurrency C. Fresh NATS, etcd and processes every round, so machine
# noise hits both builds alike. Prints per round: build, req/s, frontend CPU µs per request
# (from /proc/PID/stat), then the medians.
#
#   mkdir -p /tmp/a && cp target/release/{frontend,worker} /tmp/a    # before the change
#   cargo build --release --bins                                      # after it
#   [C=64] [DURATION=8] scripts/bench-overhead-ab.sh /tmp/a target/release [rounds]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
a=$1 b=$2 rounds=${3:-3}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install wrk" >&2; exit 1; }
bin=$root/.tools/bin run=$(mktemp -d)
model=$(bash "$root/scripts/fetch-model.sh")
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop_all; rm -rf "$run"' EXIT
cat >"$run/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"Tell me a story about a cat"}],"max_tokens":16,"stream":true,"ignore_eos":true}'
LUA
# utime + stime of a process, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

one() {
  local build=$1 nats etcd peer http
  nats=$(port) etcd=$(port) peer=$(port) http=$(port)
  rm -rf "$run/etcd"
  "$bin/nats-server" -a 127.0.0.1 -p "$nats" >"$run/nats.log" 2>&1 & pids+=($!)
  "$bin/etcd" --data-dir "$run/etcd" --listen-client-urls "http://127.0.0.1:$etcd" \
    --advertise-client-urls "http://127.0.0.1:$etcd" --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "default=http://127.0.0.1:$peer" \
    --log-level warn >"$run/etcd.log" 2>&1 & pids+=($!)
  export NATS_SERVER=nats://127.0.0.1:$nats ETCD_ENDPOINTS=http://127.0.0.1:$etcd
  "$build/worker" --model-path "$model" --model-name SmolLM2-135M-Instruct --engine mocker \
    --speedup-ratio 0 >"$run/worker.log" 2>&1 & pids+=($!)
  "$build/frontend" --http-host 127.0.0.1 --http-port "$http" --router-mode kv >"$run/frontend.log" 2>&1 &
  local f=$!; pids+=($f)
  local url="http://127.0.0.1:$http/v1/chat/completions" ok=0
  for _ in $(seq 1 300); do
    if curl -fs "$url" -H 'Content-Type: application/json' \
        -d '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":2}' >/dev/null 2>&1; then
      ok=1; break
    fi
    sleep 0.2
  done
  [ "$ok" = 1 ] || { echo "$build did not answer; frontend log:" >&2; tail -20 "$run/frontend.log" >&2; exit 1; }
  wrk -t2 -c"${C:-64}" -d2s -s "$run/post.lua" "$url" >/dev/null 2>&1   # warm-up
  local t0 out t1 n hz
  t0=$(ticks "$f")
  out=$(wrk -t2 -c"${C:-64}" -d"${DURATION:-8}"s -s "$run/post.lua" "$url")
  t1=$(ticks "$f")
  if grep -q "Non-2xx" <<<"$out"; then echo "$build: errors" >&2; grep Non-2xx <<<"$out" >&2; exit 1; fi
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  hz=$(getconf CLK_TCK)
  printf '%s %s %.0f\n' "$build" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(echo "($t1 - $t0) * 1000000 / $hz / $n" | bc -l)"
  stop_all
}

results=()
for _ in $(seq 1 "$rounds"); do
  for build in "$a" "$b"; do
    line=$(one "$build"); echo "$line"; results+=("$line")
  done
done
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
for build in "$a" "$b"; do
  rps=$(printf '%s\n' "${results[@]}" | awk -v b="$build" '$1 == b {print $2}' | median)
  cpu=$(printf '%s\n' "${results[@]}" | awk -v b="$build" '$1 == b {print $3}' | median)
  echo "median $build: $rps req/s, frontend $cpu µs CPU per request"
done
