#!/usr/bin/env bash
# Runs tandem's whole test suite: installs the external programs the tests start (nats-server,
# etcd, protoc for the build) and the bundled model if missing, builds every binary, then runs every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/install-deps.sh
bash scripts/fetch-model.sh >/dev/null
# The official OpenAI SDK, for the client-compatibility tests.
OPENAI_VERSION=3.51.0
if ! .venv/bin/python -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet "openai==$OPENAI_VERSION"
fi

start=$(date +%s)
# Integration tests start the real binaries, so build them all first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
echo "tests finished in $(( $(date +%s) - start ))s"
