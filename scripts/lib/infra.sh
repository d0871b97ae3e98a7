# Sourced by scripts/up.sh and scripts/disagg.sh: process bookkeeping and NATS + etcd.
# Needs $bin (.tools/bin) and $run (logs, data). Starts nats-server on $NATS_PORT (4222; extra
# flags in NATS_ARGS) and etcd on $ETCD_PORT (2379; peer $ETCD_PEER_PORT, default the next port)
# unless something already answers there, and exports NATS_SERVER and ETCD_ENDPOINTS. Whatever
# the caller starts goes into `pids`; it is stopped on exit, in reverse start order, so that
# tandem processes deregister while NATS and etcd still run (`stop_since` stops part of it).
NATS_PORT=${NATS_PORT:-4222}
ETCD_PORT=${ETCD_PORT:-2379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-$((ETCD_PORT + 1))}
pids=()
# stop_since N: stops what was started after the first N entries of `pids`, newest first.
stop_since() {
  for ((i=${#pids[@]}-1; i>=$1; i--)); do
    kill "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  pids=("${pids[@]:0:$1}")
}
cleanup() { stop_since 0; }
trap cleanup EXIT INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  echo "nothing answers on port $1; see $run/*.log" >&2; exit 1
}

if port_open "$NATS_PORT"; then
  echo "NATS already running on :$NATS_PORT"
else
  # shellcheck disable=SC2086 # NATS_ARGS is a list of flags
  "$bin/nats-server" -a 127.0.0.1 -p "$NATS_PORT" ${NATS_ARGS:-} >"$run/nats.log" 2>&1 &
  pids+=($!)
  wait_port "$NATS_PORT"
  echo "started nats-server on :$NATS_PORT ${NATS_ARGS:-}"
fi
if port_open "$ETCD_PORT"; then
  echo "etcd already running on :$ETCD_PORT"
else
  "$bin/etcd" --data-dir "$run/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn >"$run/etcd.log" 2>&1 &
  pids+=($!)
  wait_port "$ETCD_PORT"
  echo "started etcd on :$ETCD_PORT"
fi
export NATS_SERVER="nats://127.0.0.1:$NATS_PORT" ETCD_ENDPOINTS="http://127.0.0.1:$ETCD_PORT"
