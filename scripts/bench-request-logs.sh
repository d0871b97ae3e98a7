#!/usr/bin/env bash
# What request log lines and engine phase spans cost, side by side in one run: the same stack
# (frontend + one mocker worker without simulated delay, so the time is tandem's own path)
# started twice per round, alternating —
#   on:  the defaults (DYN_LOG=info: "request accepted/completed" in both processes, engine
#        spans under handle_payload);
#   off: DYN_LOG=info,tandem_frontend::request=off,tandem_worker::request=off,tandem_engine_api=warn
# (ON_LOG / OFF_LOG override the two filters, to measure one part at a time)
# — each measured by scripts/bench-frontend.py at every CONCURRENCY (default "1 32"). Binaries
# from target/$PROFILE (default release; `cargo build --release --bins` first). Prints one JSON
# line per run and a Markdown table of medians over ROUNDS (default 3). JSONL=1 logs as JSONL
# (as in the observability guides).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
profile=${PROFILE:-release}
bin_dir="$root/target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
[ -x "$bin_dir/frontend" ] || { echo "build first: cargo build --profile $profile --bins" >&2; exit 1; }
bin="$root/.tools/bin"
run=$(mktemp -d /tmp/tandem-bench-logs-XXXX)
ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-600}
MAX_TOKENS=${MAX_TOKENS:-16}
CONCURRENCY=${CONCURRENCY:-1 32}
NATS_PORT=${NATS_PORT:-14522}
ETCD_PORT=${ETCD_PORT:-14579}
HTTP_PORT=${HTTP_PORT:-18500}
# shellcheck source=scripts/lib/infra.sh
source "$root/scripts/lib/infra.sh"
export DYN_LEASE_TTL_SECS=2
[ -n "${JSONL:-}" ] && export DYN_LOGGING_JSONL=true

one_run() { # LABEL DYN_LOG
  local label=$1 filter=$2 n=${#pids[@]}
  DYN_LOG=$filter "$bin_dir/worker" --model-path "$model" --engine mocker --speedup-ratio 0 \
    >"$run/worker-$label.log" 2>&1 &
  pids+=($!)
  DYN_LOG=$filter "$bin_dir/frontend" --http-host 127.0.0.1 --http-port "$HTTP_PORT" \
    >"$run/frontend-$label.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$HTTP_PORT/v1/models" 2>/dev/null | grep -q SmolLM2 && break
    sleep 0.2
  done
  for c in $CONCURRENCY; do
    python3 scripts/bench-frontend.py --url "http://127.0.0.1:$HTTP_PORT" --requests "$REQUESTS" \
      --max-tokens "$MAX_TOKENS" --concurrency "$c" | sed "s/^{/{\"config\": \"$label\", /"
  done
  stop_since "$n"
  sleep 3  # the leases of this run's cards expire before the next run registers
}

results="$run/results.jsonl"
for r in $(seq 1 "$ROUNDS"); do
  one_run on "${ON_LOG:-info}" | tee -a "$results"
  one_run off "${OFF_LOG:-info,tandem_frontend::request=off,tandem_worker::request=off,tandem_engine_api=warn}" | tee -a "$results"
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| concurrency | metric | off | on | on / off |")
print("|---|---|---|---|---|")
for c in sorted({r["concurrency"] for r in rows}):
    for name, get in [("req/s", lambda r: r["requests_per_s"]),
                      ("latency p50 ms", lambda r: r["latency_ms"]["p50"]),
                      ("latency p99 ms", lambda r: r["latency_ms"]["p99"])]:
        med = {k: statistics.median(get(r) for r in rows if r["concurrency"] == c and r["config"] == k)
               for k in ("off", "on")}
        print(f"| {c} | {name} | {med['off']} | {med['on']} | {med['on'] / med['off']:.3f} |")
PY
