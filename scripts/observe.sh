#!/usr/bin/env bash
# Prometheus without Docker: runs Debian's prometheus binary (scripts/install-deps.sh puts it in
# .tools/bin) with deploy/observability/prometheus.yml, its Docker host names rewritten to where
# a native tandem stack listens (scripts/up.sh: frontend :8000, worker :8081, etcd :2379).
#   scripts/observe.sh                       # Prometheus on http://localhost:9090
#   FRONTEND=127.0.0.1:8000 WORKERS="127.0.0.1:8081 127.0.0.1:8082" ETCD=127.0.0.1:2379 \
#     PROM_PORT=9090 SCRAPE_INTERVAL=5s scripts/observe.sh
#   OBSERVE_CONFIG_ONLY=1 scripts/observe.sh > prometheus.yml   # just print the rewritten config
# Dashboards: in any Grafana, add a Prometheus datasource with uid "prometheus" pointing at
# this Prometheus, then Dashboards → Import each file of dashboards/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FRONTEND=${FRONTEND:-127.0.0.1:8000}
WORKERS=${WORKERS:-127.0.0.1:8081}
ETCD=${ETCD:-127.0.0.1:2379}
NATS_EXPORTER=${NATS_EXPORTER:-127.0.0.1:7777}

config() {
  python3 - "$root/deploy/observability/prometheus.yml" "$FRONTEND" "$WORKERS" "$ETCD" \
    "$NATS_EXPORTER" "${SCRAPE_INTERVAL:-}" <<'PY'
import re, sys
path, frontend, workers, etcd, nats, interval = sys.argv[1:7]
out = []
for line in open(path):
    if "host.docker.internal:808" in line:
        # The worker list: replaced once, by the given workers.
        if "8081" in line:
            indent = line[: len(line) - len(line.lstrip())]
            out += [f'{indent}- "{w}"\n' for w in workers.split()]
        continue
    line = line.replace("host.docker.internal:8000", frontend)
    line = line.replace("etcd-server:2379", etcd)
    line = line.replace("nats-prometheus-exporter:7777", nats)
    line = line.replace("dcgm-exporter:9401", "127.0.0.1:9401")
    if interval:
        line = re.sub(r"(scrape_interval|evaluation_interval): \S+", rf"\1: {interval}", line)
    out.append(line)
sys.stdout.write("".join(out))
PY
}

if [ -n "${OBSERVE_CONFIG_ONLY:-}" ]; then
  config
  exit 0
fi
bash "$root/scripts/install-deps.sh" >/dev/null
run="$root/.tools/run/observe"
mkdir -p "$run/data"
config >"$run/prometheus.yml"
"$root/.tools/bin/promtool" check config "$run/prometheus.yml" >/dev/null
echo "Prometheus on http://localhost:${PROM_PORT:-9090} scraping frontend $FRONTEND, workers $WORKERS, etcd $ETCD"
echo "Grafana: add a Prometheus datasource with uid 'prometheus', then import dashboards/*.json"
exec "$root/.tools/bin/prometheus" --config.file="$run/prometheus.yml" \
  --storage.tsdb.path="$run/data" --web.listen-address="0.0.0.0:${PROM_PORT:-9090}"
