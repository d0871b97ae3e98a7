#!/usr/bin/env bash
# Disaggregated serving in the layout of Dynamo's guide, and one chat completion through it:
#   nats-server and etcd (unless something already answers on their ports),
#   2 prefill workers (`--is-prefill-worker`) and 2 decode workers (`--is-decode-worker`)
#   serving the bundled SmolLM2-135M-Instruct, system status (/metrics, /health) on ports
#   8081-8082 (decode) and 8083-8084 (prefill),
#   the frontend on http://localhost:8000 with the KV-aware router (prefill workers are
#   chosen by their cached prefixes; decode workers by load).
# Each role exports traces as its own service when OTEL_EXPORT_ENABLED=true:
#   dynamo-frontend, dynamo-worker-prefill, dynamo-worker-decode (OTEL_SERVICE_NAME), and
#   DYN_LOGGING_JSONL / DYN_LOG / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT are passed through.
# Ctrl-C stops what this script started. Logs go to $RUN_DIR (default .tools/run/disagg).
# Knobs: WORKER_ARGS (every worker, e.g. "--engine mocker"), FRONTEND_ARGS (default
# "--router-mode kv"), HTTP_PORT, NATS_PORT, ETCD_PORT, ETCD_PEER_PORT, SYSTEM_PORT_BASE (8081),
# SKIP_BUILD=1 (use the binaries in target/debug as they are).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
if [ -z "${SKIP_BUILD:-}" ]; then
  echo "building tandem (first run takes a few minutes)..."
  cargo build --quiet --bins
fi
bin="$root/.tools/bin"
run=${RUN_DIR:-$root/.tools/run/disagg}
mkdir -p "$run"

HTTP_PORT=${HTTP_PORT:-8000}
SYSTEM_PORT_BASE=${SYSTEM_PORT_BASE:-8081}
FRONTEND_ARGS=${FRONTEND_ARGS:---router-mode kv}
MODEL_NAME=SmolLM2-135M-Instruct
# shellcheck source=scripts/lib/infra.sh
source "$root/scripts/lib/infra.sh"

# worker ROLE INDEX: decode workers take the first two system ports, prefill the next two.
worker() {
  local role=$1 i=$2 port
  if [ "$role" = decode ]; then port=$((SYSTEM_PORT_BASE + i)); else port=$((SYSTEM_PORT_BASE + 2 + i)); fi
  OTEL_SERVICE_NAME="dynamo-worker-$role" DYN_SYSTEM_PORT=$port \
    "$root/target/debug/worker" --model-path "$model" --model-name "$MODEL_NAME" \
    "--is-$role-worker" ${WORKER_ARGS:-} >"$run/$role-$i.log" 2>&1 &
  pids+=($!)
  echo "started $role worker $i (system port $port, log $run/$role-$i.log)"
}
worker decode 0
worker decode 1
worker prefill 0
worker prefill 1
# shellcheck disable=SC2086 # FRONTEND_ARGS is a list of flags
OTEL_SERVICE_NAME=dynamo-frontend "$root/target/debug/frontend" --http-port "$HTTP_PORT" \
  $FRONTEND_ARGS >"$run/frontend.log" 2>&1 &
pids+=($!)

# Ready when the frontend has both decode workers and both prefill workers for the model.
ready() {
  local m
  m=$(curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null) || return 1
  grep -q "^dynamo_frontend_model_workers{model=\"$MODEL_NAME\"} 2$" <<<"$m" &&
    grep -q "^dynamo_frontend_model_prefill_workers{model=\"$MODEL_NAME\"} 2$" <<<"$m"
}
# show_logs: the last lines of every log of this run (a worker that could not bind its port,
# say, says so in its own).
show_logs() {
  for f in "$run"/*.log; do echo "---- last lines of $f" >&2; tail -n 15 "$f" >&2; done
}
for _ in $(seq 1 600); do
  ready && break
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "a process of the stack exited before it was ready" >&2; show_logs; exit 1; }
  done
  sleep 0.2
done
if ! ready; then
  echo "the workers did not come up in 120 s" >&2
  show_logs
  exit 1
fi

echo
echo "tandem is serving $MODEL_NAME disaggregated (2 prefill + 2 decode) on http://localhost:$HTTP_PORT"
req='{"model":"'"$MODEL_NAME"'","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32}'
echo "curl localhost:$HTTP_PORT/v1/chat/completions -H 'Content-Type: application/json' -d '$req'"
curl -s "http://127.0.0.1:$HTTP_PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "$req"
echo
echo
echo "metrics: http://localhost:$HTTP_PORT/metrics (frontend), ports $SYSTEM_PORT_BASE-$((SYSTEM_PORT_BASE + 3)) (decode, decode, prefill, prefill)"
echo "NATS_SERVER=$NATS_SERVER ETCD_ENDPOINTS=$ETCD_ENDPOINTS; logs in $run"
echo "Ctrl-C to stop."
wait
