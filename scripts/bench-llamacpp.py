#!/usr/bin/env python3
"""llama.cpp's side of scripts/bench-engine.sh: decode and prompt-processing speed of one GGUF
file through llama.cpp's own C API (llama-cpp-python's bindings; no Python per token beyond the
argmax), greedy, on N threads.

  bench-llamacpp.py MODEL.gguf --threads 2 --tokens 128 --batches 1,4,8,16 --prompt-tokens 480
  bench-llamacpp.py --convert SRC.gguf DST.gguf f32|f16   (dequantized copy of a GGUF file)

Decode at batch B: B sequences (different prompts of ~30 tokens, the same text bench-engine's
tandem side uses) are prefilled together, then each step decodes one token of every sequence
in one llama_decode call (llama.cpp's batched API, as its `batched-bench` does); tok/s =
B × tokens / the steps' time. Prompt processing: one prompt of --prompt-tokens tokens in one
llama_decode call (n_batch and n_ubatch as large), best of three, KV cache cleared between.
Prints one JSON object per line.
"""
import argparse
import ctypes
import json
import sys
import time


def prompt_text(i):
    # The same prompt as crates/engine/examples/engine_bench.rs.
    return (f"<|im_start|>user\nWrite a long story about traveller number {i} crossing a desert."
            "<|im_end|>\n<|im_start|>assistant\n")


def convert(src, dst, kind):
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        a = dequantize(t.data, t.tensor_type).reshape(shape)
        # Norm vectors stay f32, as llama.cpp's own converter keeps them.
        a = a.astype(np.float16 if kind == "f16" and len(shape) > 1 else np.float32)
        w.add_tensor(t.name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Llama:
    def __init__(self, path, threads, n_ctx, n_seq, n_batch):
        import llama_cpp.llama_cpp as L
        self.L = L
        # llama.cpp logs every tensor it loads; keep its errors only.
        self._log = L.llama_log_set.argtypes[0](lambda level, text, data: None)
        L.llama_log_set(self._log, None)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            sys.exit(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.kv_unified = True  # one cache shared by the sequences, as tandem's paged cache is
        cp.n_threads = threads
        cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            sys.exit("llama.cpp could not create a context")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(n_batch, 0, n_seq)

    def tokenize(self, text):
        L = self.L
        buf = (L.llama_token * 4096)()
        raw = text.encode()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, 4096, False, True)
        return list(buf[:n])

    def clear(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, items):
        """items: (token, pos, seq, wants_logits); returns the batch indices with logits."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            sys.exit(f"llama_decode returned {rc}")
        return [i for i, it in enumerate(items) if it[3]]

    def argmax(self, i):
        import numpy as np
        p = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).argmax())


def decode_bench(llm, batch, tokens):
    llm.clear()
    prompts = [llm.tokenize(prompt_text(i)) for i in range(batch)]
    items = []
    for s, p in enumerate(prompts):
        items += [(t, pos, s, pos == len(p) - 1) for pos, t in enumerate(p)]
    rows = llm.decode(items)
    nxt = [llm.argmax(r) for r in rows]
    pos = [len(p) for p in prompts]
    start = time.perf_counter()
    for _ in range(tokens):
        rows = llm.decode([(nxt[s], pos[s], s, True) for s in range(batch)])
        nxt = [llm.argmax(r) for r in rows]
        pos = [p + 1 for p in pos]
    secs = time.perf_counter() - start
    return batch * tokens / secs


def prompt_bench(llm, n):
    # A long prompt of ordinary text, cut to n tokens.
    text = " ".join(prompt_text(i) for i in range(64))
    toks = llm.tokenize(text)[:n]
    if len(toks) < n:
        sys.exit(f"prompt text gives only {len(toks)} tokens")
    best = 0.0
    for _ in range(3):
        llm.clear()
        start = time.perf_counter()
        llm.decode([(t, p, 0, p == n - 1) for p, t in enumerate(toks)])
        best = max(best, n / (time.perf_counter() - start))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--convert", nargs=3, metavar=("SRC", "DST", "KIND"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--prompt-tokens", type=int, default=480)
    a = ap.parse_args()
    if a.convert:
        convert(*a.convert)
        return
    batches = [int(b) for b in a.batches.split(",")]
    n_ctx = max(max(batches) * (64 + a.tokens), a.prompt_tokens) + 64
    llm = Llama(a.model, a.threads, n_ctx, max(batches), max(512, a.prompt_tokens))
    pp = prompt_bench(llm, a.prompt_tokens)
    print(json.dumps({"engine": "llama.cpp", "kind": "prompt", "tokens": a.prompt_tokens, "tok_s": round(pp, 1)}), flush=True)
    for b in batches:
        tps = decode_bench(llm, b, a.tokens)
        print(json.dumps({"engine": "llama.cpp", "kind": "decode", "batch": b, "tok_s": round(tps, 1)}), flush=True)


if __name__ == "__main__":
    main()
