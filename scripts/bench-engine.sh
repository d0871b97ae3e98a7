#!/usr/bin/env bash
# Decode throughput of the candle engine on the bundled model, beside candle-transformers'
# quantized Llama run the way candle's `quantized` example runs it, in the same process.
# Prints markdown table rows (dtype, engine, batch, aggregate tok/s, per-stream tok/s, ratio).
#   scripts/bench-engine.sh [TOKENS]     (default 64 decode tokens per stream)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
cargo build --release --quiet -p tandem-engine --example engine_bench
echo "| dtype | engine | batch | aggregate tok/s | per-stream tok/s | ratio |"
echo "|---|---|---|---|---|---|"
for dtype in f32 quantized; do
  "$root/target/release/examples/engine_bench" "$model" "$dtype" "${1:-64}"
done
