"""Multi-turn chat workload for router benchmarks (standard library only).

Many conversations share a few long system prompts; each conversation sends several turns,
each turn carrying the whole history so far (as chat clients do). Clients run concurrently.
Reports TTFT p50/p99 and the prefix-cache hit rate (cached / prompt tokens, from `usage`).

    python3 scripts/bench-router.py --url http://127.0.0.1:8000 [--system-prompts 32]
        [--system-words 12000] [--conversations 64] [--turns 4] [--concurrency 12]
"""
import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse

WORDS = ("river stone market bridge lantern harbour meadow copper violet engine signal "
         "orchard canvas thunder marble whisper garden falcon silver compass winter "
         "ember quarry beacon timber saddle glacier velvet anchor prairie cobalt").split()


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def percentile(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round((len(v) - 1) * p)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--system-prompts", type=int, default=32)
    ap.add_argument("--system-words", type=int, default=12000)
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    systems = [text(rng, args.system_words) for _ in range(args.system_prompts)]
    convs = [{"system": systems[i % len(systems)], "rng": random.Random(args.seed * 1000 + i)}
             for i in range(args.conversations)]
    u = urllib.parse.urlparse(args.url)
    lock = threading.Lock()
    ttfts, prompt_tokens, cached_tokens, errors = [], [0], [0], [0]
    queue = list(range(len(convs)))

    def run_conversation(conv):
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=300)
        messages = [{"role": "system", "content": conv["system"]}]
        for _ in range(args.turns):
            messages.append({"role": "user", "content": text(conv["rng"], 40)})
            body = json.dumps({"model": args.model, "messages": messages, "stream": True,
                               "max_tokens": args.max_tokens, "temperature": 0,
                               "stream_options": {"include_usage": True}})
            t0 = time.perf_counter()
            first = None
            reply = []
            usage = None
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                r.read()
                with lock:
                    errors[0] += 1
                return
            while True:
                line = r.readline()
                if not line:
                    break
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    r.read()  # the end of the chunked body, so the connection can be reused
                    break
                ev = json.loads(data)
                if ev.get("usage"):
                    usage = ev["usage"]
                for ch in ev.get("choices", []):
                    c = ch.get("delta", {}).get("content")
                    if c:
                        if first is None:
                            first = time.perf_counter()
                        reply.append(c)
            messages.append({"role": "assistant", "content": "".join(reply)})
            with lock:
                if first is not None:
                    ttfts.append((first - t0) * 1000)
                if usage:
                    prompt_tokens[0] += usage["prompt_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    cached_tokens[0] += details.get("cached_tokens", 0)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            run_conversation(convs[i])

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    print(json.dumps({
        "requests": len(ttfts), "errors": errors[0], "seconds": round(elapsed, 1),
        "ttft_ms": {"p50": round(percentile(ttfts, 0.5), 1), "p99": round(percentile(ttfts, 0.99), 1),
                    "mean": round(statistics.mean(ttfts), 1)},
        "prefix_hit_rate": round(cached_tokens[0] / max(1, prompt_tokens[0]), 3),
    }))


if __name__ == "__main__":
    main()
