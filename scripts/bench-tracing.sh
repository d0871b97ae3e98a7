#!/usr/bin/env bash
# Frontend latency (scripts/bench-frontend.py, streamed chat, concurrency 1) with trace export
# off, on (to a live OTLP receiver, target/debug/otlp-sink), and on with the collector down.
# Mocker worker without simulated delay, so the numbers are tandem's own path.
#   scripts/bench-tracing.sh [requests] [max_tokens...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
requests=${1:-300}
shift || true
tokens=("${@:-8 64}")
cargo build --quiet --bins
sink_port=${SINK_PORT:-4399}
dead_port=${DEAD_PORT:-4398}
http_port=${HTTP_PORT:-8000}

wait_models() {
  for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$http_port/v1/models" 2>/dev/null | grep -q SmolLM2 && return 0
    sleep 0.2
  done
  echo "stack did not come up" >&2; return 1
}

run() {
  local label=$1; shift
  env "$@" WORKER_ARGS="--engine mocker --speedup-ratio 0" HTTP_PORT="$http_port" \
    bash scripts/up.sh >"$root/.tools/run/bench-tracing-$label.log" 2>&1 &
  local pid=$!
  wait_models
  for mt in ${tokens[*]}; do
    printf '%-14s ' "$label"
    python3 scripts/bench-frontend.py --url "http://127.0.0.1:$http_port" \
      --requests "$requests" --max-tokens "$mt" | tail -1
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

mkdir -p "$root/.tools/run"
target/debug/otlp-sink "127.0.0.1:$sink_port" >"$root/.tools/run/otlp-sink.log" 2>&1 &
sink=$!
trap 'kill $sink 2>/dev/null || true' EXIT

run export-off
run export-on OTEL_EXPORT_ENABLED=1 OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:$sink_port"
run collector-down OTEL_EXPORT_ENABLED=1 OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:$dead_port"
echo "spans received by the live receiver: $(tail -1 "$root/.tools/run/otlp-sink.log")"
echo "warnings with the collector down:"
grep -h "OTLP trace export failed" "$root"/.tools/run/{frontend,worker}.log 2>/dev/null | cut -c1-200 || true
