#!/usr/bin/env bash
# What a JSON Schema mask (structured output, llguidance) costs the candle engine's decode,
# at batch 1 and 8: plain and guided runs alternate on one engine (median of ROUNDS each).
# Prints markdown table rows (batch, plain tok/s, guided tok/s, guided ÷ plain, µs per token).
#   scripts/bench-structured.sh [TOKENS] [ROUNDS]   (defaults 64 and 3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
cargo build --release --quiet -p tandem-engine --example guided_bench
echo "| batch | plain tok/s | JSON-schema tok/s | guided ÷ plain | mask cost µs/token |"
echo "|---|---|---|---|---|"
"$root/target/release/examples/guided_bench" "$model" "${1:-64}" "${2:-3}"
