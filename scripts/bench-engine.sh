#!/usr/bin/env bash
# The CPU engine beside llama.cpp on the same file, threads and machine, in one run: prompt
# processing and greedy decode at batch 1/4/8/16 for each weight format tandem serves — Q4_1
# as shipped (tandem --dtype quantized), F16 and F32 (tandem dequantizes the Q4_1 file on load;
# llama.cpp gets the same values as an F16 / F32 GGUF made here with the `gguf` package).
#   scripts/bench-engine.sh [--write] [--formats q4_1,f16,f32] [--tokens 128] [--prompt-tokens 480]
#                           [--isa avx2]
# llama.cpp: llama-cpp-python 0.3.36 built from PyPI into .bench/venv-llamacpp (once, ~8 min on
# 2 cores), driven through its C API by scripts/bench-llamacpp.py. tandem:
# crates/engine/examples/engine_bench.rs (release). Both use THREADS threads (default: the
# machine's cores; tandem's through RAYON_NUM_THREADS).
# Prints a markdown table (tok/s and tandem ÷ llama.cpp); --write also puts it, with the CPU
# named, between the "engine bench" markers of docs/benchmarks.md.
# --isa avx2: both sides limited to AVX2 on an AVX-512 CPU, as on a CPU without AVX-512:
# llama.cpp built for AVX2/FMA/F16C only (its own venv, .bench/venv-llamacpp-avx2), tandem with
# TANDEM_CPU_KERNELS=avx2 (the worker's --cpu-kernels avx2); --write then fills the
# "engine bench (avx2)" markers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
write=0 formats=q4_1,f16,f32 tokens=128 prompt_tokens=480 isa=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --write) write=1; shift ;;
    --formats) formats=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --prompt-tokens) prompt_tokens=$2; shift 2 ;;
    --isa) isa=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-engine.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
threads=${THREADS:-$(nproc)}
bash scripts/install-deps.sh >/dev/null
model=$(bash scripts/fetch-model.sh)
venv="$root/.bench/venv-llamacpp" models="$root/.bench/models" out="$root/.bench/engine"
case "$isa" in
  auto) marker="engine bench" ;;
  avx2)
    venv="$root/.bench/venv-llamacpp-avx2" marker="engine bench (avx2)"
    export TANDEM_CPU_KERNELS=avx2 ;;
  *) echo "bench-engine.sh: --isa auto or avx2, not $isa" >&2; exit 2 ;;
esac
mkdir -p "$models" "$out"
# On CPUs with AMX (Intel Sapphire Rapids and later) llama.cpp's native build compiles its AMX
# kernels in, and on such a machine here (a VM) every multi-token llama_decode crashed with
# SIGSEGV, in llama-cpp-python's own high-level API too; built without AMX it runs (its AVX-512
# paths stay). LLAMA_CMAKE_ARGS adds CMake flags of your own (after these, so they win). The
# flags a venv was built with are kept beside it; other flags rebuild it.
cmake_args=""
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  cmake_args="-DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16 -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
fi
if [ "$isa" = avx2 ]; then
  cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
cmake_args="$cmake_args ${LLAMA_CMAKE_ARGS:-}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import llama_cpp, gguf' 2>/dev/null \
  || [ "$(cat "$venv/cmake-args" 2>/dev/null)" != "$cmake_args" ]; then
  echo "installing llama-cpp-python 0.3.36 from PyPI (builds llama.cpp, once)..." >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$threads "$venv/bin/pip" install -q --no-cache-dir \
    llama-cpp-python==0.3.36 gguf numpy >&2
  printf '%s' "$cmake_args" >"$venv/cmake-args"
fi
echo "building engine_bench (release)..." >&2
cargo build --release --quiet -p tandem-engine --example engine_bench

results="$out/results.jsonl"
: >"$results"
for f in ${formats//,/ }; do
  case "$f" in
    q4_1) file=$model dtype=quantized label="Q4_1 (as shipped)" ;;
    f16|f32)
      up=$(tr a-z A-Z <<<"$f")
      file="$models/SmolLM2-135M-Instruct.$up.gguf" dtype=$f label="$up (dequantized from Q4_1)"
      [ -s "$file" ] || "$venv/bin/python" scripts/bench-llamacpp.py --convert "$model" "$file" "$f" ;;
    *) echo "bench-engine.sh: unknown format $f (q4_1, f16, f32)" >&2; exit 2 ;;
  esac
  echo "$label: llama.cpp..." >&2
  "$venv/bin/python" scripts/bench-llamacpp.py "$file" --threads "$threads" --tokens "$tokens" \
    --prompt-tokens "$prompt_tokens" | sed "s/^{/{\"format\": \"$label\", /" >>"$results"
  echo "$label: tandem..." >&2
  RAYON_NUM_THREADS=$threads "$root/target/release/examples/engine_bench" "$model" "$dtype" "$tokens" \
    "$prompt_tokens" | sed "s/^{/{\"format\": \"$label\", /" >>"$results"
done

cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
table=$(python3 - "$results" "$cpu" "$threads" "$tokens" "$prompt_tokens" <<'PY'
import json, os, sys, datetime
path, cpu, threads, tokens, ptoks = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
def key(r):
    return (r["format"], r["kind"], r.get("batch", 0))
by = {}
for r in rows:
    by.setdefault(key(r), {})[r["engine"]] = r["tok_s"]
day = datetime.date.today().isoformat()
isa = " --isa avx2 (both sides limited to AVX2)" if os.environ.get("TANDEM_CPU_KERNELS") == "avx2" else ""
print(f"`scripts/bench-engine.sh{isa}` on {cpu}, {threads} threads, {day}: greedy decode of {tokens} tokens "
      f"after ~30-token prompts (aggregate tok/s over the batch), prompt processing of one "
      f"{ptoks}-token prompt. llama.cpp: llama-cpp-python 0.3.36 built from PyPI, its batched C API.")
print()
print("| weights | measure | llama.cpp tok/s | tandem tok/s | tandem ÷ llama.cpp |")
print("|---|---|---|---|---|")
for (fmt, kind, batch), v in by.items():
    what = f"prompt processing ({ptoks} tokens)" if kind == "prompt" else f"decode, batch {batch}"
    l, t = v.get("llama.cpp"), v.get("tandem")
    ratio = f"{t / l:.2f}×" if l and t else "—"
    print(f"| {fmt} | {what} | {l if l is not None else '—'} | {t if t is not None else '—'} | {ratio} |")
PY
)
echo "$table"
if [ "$write" = 1 ]; then
  python3 - "$root/docs/benchmarks.md" "$table" "$marker" <<'PY'
import sys
path, table, marker = sys.argv[1:]
s = open(path).read()
start, end = f"<!-- {marker}: start -->", f"<!-- {marker}: end -->"
block = f"{start}\n{table}\n{end}"
if start in s and end in s:
    s = s[: s.index(start)] + block + s[s.index(end) + len(end):]
else:
    s += "\n" + block + "\n"
open(path, "w").write(s)
PY
  echo "written to docs/benchmarks.md" >&2
fi
