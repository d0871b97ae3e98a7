# Sourced by scripts/bench.sh and scripts/bench-router.sh: NVIDIA Dynamo 1.6.1 from PyPI as the
# peer the benchmarks compare against, and the HF-style tokenizer directory its processes need.
# Needs $root (the repository). Sets DYNAMO_PY (the venv's python) and DYNAMO_HF (the tokenizer
# directory); the functions below fill them in on first use.
DYNAMO_VENV="$root/.bench/venv-dynamo"
DYNAMO_PY="$DYNAMO_VENV/bin/python"
DYNAMO_HF="$root/.bench/hf-smollm2"

# install_dynamo: ai-dynamo 1.6.1 into .bench/venv-dynamo, once. Its dependencies go in by hand
# and ai-dynamo itself with --no-deps: one of them, aisimulate, cannot be fetched from PyPI.
install_dynamo() {
  if [ -x "$DYNAMO_PY" ] && "$DYNAMO_PY" -c 'import dynamo.frontend, dynamo.mocker' 2>/dev/null; then
    return 0
  fi
  printf '[dynamo %s] installing ai-dynamo 1.6.1 into %s (once; its dependencies by hand: one of them, aisimulate, cannot be fetched)\n' \
    "$(date +%H:%M:%S)" "$DYNAMO_VENV"
  python3 -m venv "$DYNAMO_VENV"
  "$DYNAMO_VENV/bin/pip" install --quiet "ai-dynamo-runtime==1.6.1" "aiohttp>=3.14.3,<4" "certifi>=2026.10.19" \
    "msgspec>=0.19" "prometheus-client>=0.23.1,<1" "pyzmq>=26" "tqdm>=4" "transformers>=4.56" \
    "typing-extensions>=4.10" "zstandard>=0.23,<1" "redis>=6.2,<9" "kubernetes>=32.0.1,<33"
  "$DYNAMO_VENV/bin/pip" install --quiet --no-deps "ai-dynamo==1.6.1"
}

# tokenizer_dir TARGET MODEL: makes .bench/hf-smollm2 (config.json, tokenizer.json,
# tokenizer_config.json with the chat template) from the bundled GGUF model with tandem's
# hf_dir example (TARGET/examples/hf_dir), unless it is already there. Dynamo's mocker and
# frontend, and aiperf, read the tokenizer from it; the GGUF file itself they cannot read.
tokenizer_dir() {
  local target=$1 model=$2
  [ -s "$DYNAMO_HF/tokenizer.json" ] && [ -s "$DYNAMO_HF/tokenizer_config.json" ] && return 0
  if [ ! -x "$target/examples/hf_dir" ]; then
    echo "$target/examples/hf_dir missing: cargo build --release --examples -p tandem-model" >&2
    return 1
  fi
  "$target/examples/hf_dir" "$model" "$DYNAMO_HF" >/dev/null
}
