#!/usr/bin/env bash
# Runs tandem's whole test suite: installs the external programs the tests start (nats-server,
# etcd, protoc for the build) and the bundled model if missing, builds every binary, then runs every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/install-deps.sh
bash scripts/fetch-model.sh >/dev/null

start=$(date +%s)
# Integration tests start the real binaries, so build them all first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
echo "tests finished in $(( $(date +%s) - start ))s"
