#!/usr/bin/env bash
# What tandem's observability costs a request, side by side in one run. The same stack
# (frontend + one mocker worker without simulated delay, so the time is tandem's own path) is
# started once per configuration per round:
#   quiet:   DYN_LOG=info,tandem_frontend::request=off,tandem_worker::request=off,tandem_engine_api=warn
#            (no request log lines, no engine phase spans; the baseline)
#   default: DYN_LOG=info — "request accepted/completed" in both processes, engine.* spans
#            under handle_payload, export off (what a user runs without setting anything)
#   export:  default plus OTEL_EXPORT_ENABLED=1 (traces and log records over OTLP gRPC to a live
#            receiver, target/$PROFILE/otlp-sink: `cargo build --release -p tandem-tests --bin otlp-sink`)
#   dead:    default plus export to a port where nothing listens (the collector down)
# CONFIGS picks them (default "quiet default"). Each run is measured by scripts/bench-frontend.py
# at every CONCURRENCY (default "1 32"): latency, req/s, and the CPU time the frontend and
# worker spent per request. The order of the configurations rotates every round, and each
# configuration is compared with the baseline of the SAME round (paired), so drift on a shared
# machine cancels: the table gives the median of the per-round ratios with a bootstrap 95 %
# interval. Binaries from target/$PROFILE (default release; `cargo build --release --bins`
# first; BIN_DIR overrides). ROUNDS (default 20), REQUESTS per run (default 1000), MAX_TOKENS
# (default 16); JSONL=1 logs as JSONL (as in the observability guides).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
profile=${PROFILE:-release}
bin_dir=${BIN_DIR:-"$root/target/$([ "$profile" = dev ] && echo debug || echo "$profile")"}
[ -x "$bin_dir/frontend" ] || { echo "build first: cargo build --profile $profile --bins" >&2; exit 1; }
bin="$root/.tools/bin"
run=$(mktemp -d /tmp/tandem-bench-tracing-XXXX)
ROUNDS=${ROUNDS:-20}
REQUESTS=${REQUESTS:-1000}
MAX_TOKENS=${MAX_TOKENS:-16}
CONCURRENCY=${CONCURRENCY:-1 32}
read -r -a configs <<<"${CONFIGS:-quiet default}"
NATS_PORT=${NATS_PORT:-14522}
ETCD_PORT=${ETCD_PORT:-14579}
HTTP_PORT=${HTTP_PORT:-18500}
SINK_PORT=${SINK_PORT:-14399}
DEAD_PORT=${DEAD_PORT:-14398}
# shellcheck source=scripts/lib/infra.sh
source "$root/scripts/lib/infra.sh"
export DYN_LEASE_TTL_SECS=2
[ -n "${JSONL:-}" ] && export DYN_LOGGING_JSONL=true
quiet_log=info,tandem_frontend::request=off,tandem_worker::request=off,tandem_engine_api=warn

config_env() { # CONFIG -> env assignments, one per line
  case $1 in
    quiet) echo "DYN_LOG=$quiet_log" ;;
    default) echo "DYN_LOG=info" ;;
    export) printf '%s\n' DYN_LOG=info OTEL_EXPORT_ENABLED=1 \
      "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT" ;;
    dead) printf '%s\n' DYN_LOG=info OTEL_EXPORT_ENABLED=1 \
      "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$DEAD_PORT" ;;
    *) echo "unknown configuration $1 (quiet, default, export, dead)" >&2; return 1 ;;
  esac
}

if [[ " ${configs[*]} " == *" export "* ]]; then
  [ -x "$bin_dir/otlp-sink" ] || { echo "build the receiver: cargo build --profile $profile -p tandem-tests --bin otlp-sink" >&2; exit 1; }
  "$bin_dir/otlp-sink" "127.0.0.1:$SINK_PORT" >"$run/otlp-sink.log" 2>&1 &
  pids+=($!)
fi

one_run() { # ROUND CONFIG
  local round=$1 label=$2 n=${#pids[@]} worker frontend
  local -a envs
  mapfile -t envs < <(config_env "$label")
  env "${envs[@]}" OTEL_SERVICE_NAME=worker "$bin_dir/worker" --model-path "$model" \
    --engine mocker --speedup-ratio 0 >"$run/worker-$label.log" 2>&1 &
  pids+=($!); worker=$!
  env "${envs[@]}" OTEL_SERVICE_NAME=frontend "$bin_dir/frontend" --http-host 127.0.0.1 \
    --http-port "$HTTP_PORT" >"$run/frontend-$label.log" 2>&1 &
  pids+=($!); frontend=$!
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$HTTP_PORT/v1/models" 2>/dev/null | grep -q SmolLM2 && break
    sleep 0.2
  done
  for c in $CONCURRENCY; do
    python3 scripts/bench-frontend.py --url "http://127.0.0.1:$HTTP_PORT" --requests "$REQUESTS" \
      --max-tokens "$MAX_TOKENS" --concurrency "$c" --cpu-pids "$frontend,$worker" |
      sed "s/^{/{\"round\": $round, \"config\": \"$label\", /"
  done
  stop_since "$n"
  sleep 3 # the leases of this run's cards expire before the next run registers
}

results="$run/results.jsonl"
k=${#configs[@]}
for r in $(seq 1 "$ROUNDS"); do
  for i in $(seq 0 $((k - 1))); do
    one_run "$r" "${configs[$(((i + r) % k))]}" | tee -a "$results"
  done
done
[ -f "$run/otlp-sink.log" ] && echo "live receiver: $(tail -1 "$run/otlp-sink.log")"
grep -h "export failed" "$run"/*.log 2>/dev/null | cut -c1-200 | sort | uniq -c || true
python3 - "$results" "${configs[0]}" <<'PY'
import json, random, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = sys.argv[2]
metrics = [("req/s", lambda r: r["requests_per_s"]),
           ("latency p50 ms", lambda r: r["latency_ms"]["p50"]),
           ("latency p99 ms", lambda r: r["latency_ms"]["p99"]),
           ("CPU µs / request (frontend + worker)", lambda r: r["cpu_us_per_request"])]
configs = [base] + [c for c in dict.fromkeys(r["config"] for r in rows) if c != base]
others = [c for c in configs if c != base]
def ci(xs):  # bootstrap 95 % interval of the median
    rnd = random.Random(1)
    meds = sorted(statistics.median(rnd.choices(xs, k=len(xs))) for _ in range(2000))
    return meds[50], meds[1949]
print("| concurrency | metric | " + " | ".join(configs) + " | "
      + " | ".join(f"{o} / {base} (paired median, 95 % CI)" for o in others) + " |")
print("|---" * (2 + len(configs) + len(others)) + "|")
for c in sorted({r["concurrency"] for r in rows}):
    at = {(r["round"], r["config"]): r for r in rows if r["concurrency"] == c}
    for name, get in metrics:
        meds = [statistics.median(get(r) for (_, cf), r in at.items() if cf == k) for k in configs]
        cells = [f"{m:.4g}" for m in meds]
        for o in others:
            ratios = [get(at[(rd, o)]) / get(at[(rd, base)])
                      for (rd, cf) in at if cf == base and (rd, o) in at]
            lo, hi = ci(ratios)
            cells.append(f"{statistics.median(ratios):.3f} ({lo:.3f}–{hi:.3f}, n={len(ratios)})")
        print(f"| {c} | {name} | " + " | ".join(cells) + " |")
PY
