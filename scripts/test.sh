#!/usr/bin/env bash
# Runs tandem's whole test suite: installs the external programs the tests start (nats-server,
# etcd, protoc for the build) and the bundled model if missing, builds every binary, then runs every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/install-deps.sh
bash scripts/fetch-model.sh >/dev/null
# The official OpenAI SDK, for the client-compatibility tests; pyzmq + msgspec for the test
# that reads KV events the way consumers of vLLM's ZMQ events do; jsonschema + PyYAML to
# validate the compose files.
PY_PKGS=("openai==3.51.0" "pyzmq==27.1.0" "msgspec==0.19.0" "jsonschema==4.23.0" "PyYAML==6.0.2")
if ! .venv/bin/python - "${PY_PKGS[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
PY
then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet "${PY_PKGS[@]}"
fi

start=$(date +%s)
# Integration tests start the real binaries, so build them all first.
cargo build --workspace --bins --examples
cargo test --workspace --no-fail-fast "$@"
echo "tests finished in $(( $(date +%s) - start ))s"
