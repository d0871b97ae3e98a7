#!/usr/bin/env bash
# Disaggregated vs aggregated serving, side by side in one run, with the mocker at real speed
# (Dynamo's timing model, --speedup-ratio 1): 4 aggregated workers, 2 prefill + 2 decode
# workers, and the same 2 + 2 with conditional disaggregation (--max-local-prefill-length
# $LOCAL_PREFILL, default 512: short prompts prefill on the decode workers), each behind a
# frontend with the KV router, under the same load from
# scripts/bench-disagg.py (chat streams plus long prompts arriving alongside). ROUNDS rounds,
# alternating; one JSON line per run, then a Markdown table of the medians over rounds.
# Knobs: ROUNDS (2), SECONDS_PER_RUN (40), LOAD_ARGS (extra bench-disagg.py flags),
# WORKER_ARGS (extra worker flags), NATS_PORT (14222), ETCD_PORT (12379), HTTP_PORT (18000).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
cargo build --quiet --bins
bin="$root/.tools/bin"
run=$(mktemp -d /tmp/tandem-bench-disagg-XXXX)
ROUNDS=${ROUNDS:-2}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-40}
NATS_PORT=${NATS_PORT:-14222}
ETCD_PORT=${ETCD_PORT:-12379}
HTTP_PORT=${HTTP_PORT:-18000}
LOCAL_PREFILL=${LOCAL_PREFILL:-512}
# shellcheck source=scripts/lib/infra.sh
source "$root/scripts/lib/infra.sh"
infra_count=${#pids[@]}
export DYN_LEASE_TTL_SECS=2

worker() { # NAME FLAGS...
  local name=$1; shift
  # shellcheck disable=SC2086
  "$root/target/debug/worker" --model-path "$model" --engine mocker \
    --speedup-ratio 1 ${WORKER_ARGS:-} "$@" >"$run/$name.log" 2>&1 &
  pids+=($!)
}
ready() { # DECODE PREFILL
  local m
  m=$(curl -fs "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null) || return 1
  grep -q "^dynamo_frontend_model_workers{model=\"SmolLM2-135M-Instruct\"} $1$" <<<"$m" &&
    { [ "$2" = 0 ] || grep -q "^dynamo_frontend_model_prefill_workers{model=\"SmolLM2-135M-Instruct\"} $2$" <<<"$m"; }
}
one_run() { # CONFIG
  local config=$1 d p extra=()
  [ "$config" = conditional ] && extra=(--max-local-prefill-length "$LOCAL_PREFILL")
  if [ "$config" = agg ]; then
    for i in 0 1 2 3; do worker "agg-$i"; done; d=4; p=0
  else
    worker decode-0 --is-decode-worker; worker decode-1 --is-decode-worker
    worker prefill-0 --is-prefill-worker; worker prefill-1 --is-prefill-worker; d=2; p=2
  fi
  "$root/target/debug/frontend" --http-host 127.0.0.1 --http-port "$HTTP_PORT" --router-mode kv \
    "${extra[@]}" >"$run/frontend-$config.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do ready $d $p && break; sleep 0.2; done
  ready $d $p || { echo "$config did not come up; logs in $run" >&2; exit 1; }
  # shellcheck disable=SC2086
  python3 scripts/bench-disagg.py --url "http://127.0.0.1:$HTTP_PORT" --seconds "$SECONDS_PER_RUN" \
    ${LOAD_ARGS:-} | sed "s/^{/{\"config\": \"$config\", /"
  stop_since "$infra_count"
  # The next deployment must not see this one's cards: wait for the leases to go.
  sleep 3
}
results="$run/results.jsonl"
for r in $(seq 1 "$ROUNDS"); do
  for config in agg disagg conditional; do
    one_run "$config" | tee -a "$results"
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = ["chat_itl_p50_ms", "chat_itl_p99_ms", "chat_stall_p50_ms", "chat_stall_p99_ms", "chat_ttft_p50_ms", "chat_ttft_p99_ms",
        "long_ttft_p50_ms", "long_ttft_p99_ms", "chat_requests", "long_requests", "errors"]
configs = ("agg", "disagg", "conditional")
med = {c: {k: statistics.median(r[k] or 0 for r in rows if r["config"] == c) for k in keys} for c in configs}
print("| metric | 4 aggregated | 2 prefill + 2 decode | disagg / agg | 2 + 2 conditional | conditional / agg |")
print("|---|---|---|---|---|---|")
for k in keys:
    a, d, c = (med[x][k] for x in configs)
    r = lambda v: f"{v / a:.2f}" if a else "-"
    print(f"| {k} | {a:.1f} | {d:.1f} | {r(d)} | {c:.1f} | {r(c)} |")
PY
