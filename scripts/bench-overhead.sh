#!/usr/bin/env bash
# Frontend overhead beside Dynamo 1.6.1: wrk (keep-alive, 2 threads) posting streamed chat
# (16 tokens, ignore_eos) through each side's frontend with the KV router to one mocker
# worker that takes no time (tandem --speedup-ratio 0; Dynamo's mocker at 1e6), at
# concurrency 1 and 64. Sides alternate for ROUNDS rounds on one machine (fresh NATS, etcd
# and processes each time); prints each round and the medians with tandem ÷ Dynamo.
#   [ROUNDS=3] [DURATION=12] scripts/bench-overhead.sh
# Needs wrk (Debian: apt-get install wrk), the release build, and .bench/ from scripts/bench.sh
# --peer dynamo (ai-dynamo 1.6.1 and the tokenizer directory).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v wrk >/dev/null || { echo "wrk missing: apt-get install wrk" >&2; exit 1; }
dyn="$root/.bench/venv-dynamo/bin/python" hf="$root/.bench/hf-smollm2"
[ -x "$dyn" ] && [ -d "$hf" ] || { echo "run scripts/bench.sh --peer dynamo --tiny first (installs Dynamo)" >&2; exit 1; }
model=$(bash scripts/fetch-model.sh)
cargo build --release --quiet --bins
bin="$root/.tools/bin" run="$root/.tools/run/bench-overhead"
NATS_PORT=${NATS_PORT:-4400} ETCD_PORT=${ETCD_PORT:-2500} HTTP_PORT=${HTTP_PORT:-8030} SYSTEM_PORT=${SYSTEM_PORT:-18090}
lua="$run/post.lua"
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop_all EXIT

one() {
  local side=$1
  rm -rf "$run"; mkdir -p "$run"
  cat >"$lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"Tell me a story about a cat"}],"max_tokens":16,"stream":true,"ignore_eos":true}'
LUA
  "$bin/nats-server" -a 127.0.0.1 -p "$NATS_PORT" >"$run/nats.log" 2>&1 & pids+=($!)
  "$bin/etcd" --data-dir "$run/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "default=http://127.0.0.1:$((ETCD_PORT + 1))" --log-level warn >"$run/etcd.log" 2>&1 & pids+=($!)
  export NATS_SERVER="nats://127.0.0.1:$NATS_PORT" ETCD_ENDPOINTS="http://127.0.0.1:$ETCD_PORT"
  if [ "$side" = tandem ]; then
    DYN_SYSTEM_PORT=$SYSTEM_PORT target/release/worker --model-path "$model" --engine mocker --speedup-ratio 0 >"$run/worker.log" 2>&1 & pids+=($!)
    target/release/frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" --router-mode kv >"$run/frontend.log" 2>&1 & pids+=($!)
  else
    DYN_SYSTEM_ENABLED=true DYN_SYSTEM_PORT=$SYSTEM_PORT "$dyn" -m dynamo.mocker --model-path "$hf" \
      --model-name SmolLM2-135M-Instruct --speedup-ratio 1000000 >"$run/worker.log" 2>&1 & pids+=($!)
    "$dyn" -m dynamo.frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" --router-mode kv >"$run/frontend.log" 2>&1 & pids+=($!)
  fi
  local url="http://127.0.0.1:$HTTP_PORT/v1/chat/completions"
  for _ in $(seq 1 240); do
    curl -fs "$url" -H 'Content-Type: application/json' \
      -d '{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":2}' >/dev/null 2>&1 && break
    sleep 0.5
  done
  wrk -t1 -c1 -d3s -s "$lua" "$url" >/dev/null 2>&1   # warm-up
  for c in 1 64; do
    local out
    out=$(wrk -t$(( c < 2 ? 1 : 2 )) -c"$c" -d"${DURATION:-12}"s --latency -s "$lua" "$url")
    if grep -q "Non-2xx" <<<"$out"; then echo "$side c=$c: errors"; grep Non-2xx <<<"$out"; exit 1; fi
    printf '%s %s %s %s\n' "$side" "$c" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" "$(awk '$1 == "50%" {print $2}' <<<"$out")"
  done
  stop_all
}

results=$(for r in $(seq 1 "${ROUNDS:-3}"); do one tandem; one dynamo; done | tee /dev/stderr)
python3 - "$results" <<'PY'
import statistics, sys
rows = [l.split() for l in sys.argv[1].splitlines() if l.strip()]
def ms(v):
    return float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000
print("| concurrency | tandem req/s | Dynamo req/s | tandem ÷ Dynamo | tandem p50 | Dynamo p50 |")
print("|---|---|---|---|---|---|")
for c in ("1", "64"):
    t = [float(r[2]) for r in rows if r[0] == "tandem" and r[1] == c]
    d = [float(r[2]) for r in rows if r[0] == "dynamo" and r[1] == c]
    tp = [ms(r[3]) for r in rows if r[0] == "tandem" and r[1] == c]
    dp = [ms(r[3]) for r in rows if r[0] == "dynamo" and r[1] == c]
    mt, md = statistics.median(t), statistics.median(d)
    print(f"| {c} | {mt:.0f} | {md:.0f} | {mt / md:.2f}× | {statistics.median(tp):.2f} ms | {statistics.median(dp):.2f} ms |")
PY
