#!/usr/bin/env bash
# Starts a local tandem stack and answers one chat completion:
#   nats-server (4222) and etcd (2379), unless something already answers there,
#   a worker serving the bundled SmolLM2-135M-Instruct (system status on 8081),
#   the frontend on http://localhost:8000 (OpenAI API, /metrics).
# Ctrl-C stops what this script started. Logs and etcd data go to .tools/run/.
# WORKER_ARGS adds worker flags (e.g. WORKER_ARGS="--dtype quantized" or "--engine mocker").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
echo "building tandem (first run takes a few minutes)..."
cargo build --quiet --bins
bin="$root/.tools/bin"
run="$root/.tools/run"
mkdir -p "$run"

# JetStream on and monitoring on :8222, as Dynamo's compose file runs NATS.
NATS_ARGS=${NATS_ARGS:--js -sd $run/jetstream -m 8222}
# shellcheck source=scripts/lib/infra.sh
source "$root/scripts/lib/infra.sh"
HTTP_PORT=${HTTP_PORT:-8000}
MODEL_NAME=SmolLM2-135M-Instruct

DYN_SYSTEM_PORT=${DYN_SYSTEM_PORT:-8081} "$root/target/debug/worker" --model-path "$model" \
  --model-name "$MODEL_NAME" ${WORKER_ARGS:-} >"$run/worker.log" 2>&1 &
pids+=($!)
"$root/target/debug/frontend" --http-port "$HTTP_PORT" >"$run/frontend.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$HTTP_PORT/v1/models" 2>/dev/null | grep -q "$MODEL_NAME" && break
  sleep 0.2
done
if ! curl -fs "http://127.0.0.1:$HTTP_PORT/v1/models" | grep -q "$MODEL_NAME"; then
  echo "the model did not come up; see $run/worker.log and $run/frontend.log" >&2
  exit 1
fi

echo
echo "tandem is serving $MODEL_NAME on http://localhost:$HTTP_PORT"
req='{"model":"'"$MODEL_NAME"'","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32}'
echo "curl localhost:$HTTP_PORT/v1/chat/completions -H 'Content-Type: application/json' -d '$req'"
curl -s "http://127.0.0.1:$HTTP_PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "$req"
echo
echo
echo "metrics: http://localhost:$HTTP_PORT/metrics (frontend), http://localhost:${DYN_SYSTEM_PORT:-8081}/metrics (worker)"
echo "NATS_SERVER=$NATS_SERVER ETCD_ENDPOINTS=$ETCD_ENDPOINTS; logs in $run"
echo "Ctrl-C to stop."
wait
