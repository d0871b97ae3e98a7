#!/usr/bin/env bash
# KV data-plane bandwidth next to plain loopback TCP (same bytes, same chunks, same buffers),
# for 1k, 8k and 32k-token prompts in the bundled model's f32 layout; prints a Markdown table.
# PROFILE=release for an optimised build (default: the dev profile the tests use).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-dev}
cargo run --quiet --profile "$profile" -p tandem-worker --example kv_transfer_bench
