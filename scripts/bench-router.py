"""Multi-turn chat workload for router benchmarks (standard library only).

Many conversations share a few long system prompts; each conversation sends several turns,
each turn carrying the whole history so far (as chat clients do). Clients run concurrently.
Prints one JSON line: TTFT p50/p99/mean (and request latency p50, mean inter-token latency),
the prefix-cache hit rate (cached / prompt tokens, from `usage.prompt_tokens_details.
cached_tokens`, which tandem's and Dynamo's mockers both fill in from the worker's cache), and
the workload's size in tokens as the server counted them: `system_prompt_tokens` (a first
turn's prompt: one system prompt, one user message and the template), `working_set_tokens`
(every distinct prompt token once, plus the last replies: what caches would hold to keep
everything) and `max_hit_rate` (1 - distinct / all prompt tokens: only a token's first
appearance must miss). `--label key=value` adds fields to it.

    python3 scripts/bench-router.py --url http://127.0.0.1:8000 [--system-prompts 32]
        [--system-words 12000] [--conversations 64] [--turns 4] [--concurrency 12]
        [--think-ms 0] [--label regime=partial ...]

`--think-ms T`: after each reply a client waits a random time (exponential, mean T ms; seeded)
before the next turn, as a person reading it would. With 0 (the default) clients send the next
turn at once, so clients whose turns ended in the same decode step send their next ones
together, and a faster router also raises the request rate it is measured at.
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
    ap.add_argument("--max-tokens-stddev", type=float, default=0.0,
                    help="draw each turn's max_tokens from a normal distribution around --max-tokens "
                         "with this standard deviation (rounded, at least 1; seeded), as aiperf's "
                         "--output-tokens-stddev does")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--think-ms", type=float, default=0.0,
                    help="mean of a random pause (exponential) after each reply, in ms")
    ap.add_argument("--trace", metavar="FILE",
                    help="also write one JSON line per request (conversation, prompt, turn, start, "
                         "TTFT, first to second token, latency, prompt and cached tokens) to FILE")
    ap.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="a field added to the JSON line (repeatable)")
    args = ap.parse_args()
    labels = dict(kv.split("=", 1) for kv in args.label)
    rng = random.Random(args.seed)
    systems = [text(rng, args.system_words) for _ in range(args.system_prompts)]
    convs = [{"prompt": i % len(systems), "system": systems[i % len(systems)],
              "rng": random.Random(args.seed * 1000 + i),
              "think": random.Random(args.seed * 1000 + i + 500_000),
              "lengths": random.Random(args.seed * 1000 + i + 900_000), "index": i, "first": None, "last": 0, "reply": 0}
             for i in range(args.conversations)]
    u = urllib.parse.urlparse(args.url)
    lock = threading.Lock()
    ttfts, latencies, itls, prompt_tokens, cached_tokens, errors = [], [], [], [0], [0], [0]
    error_kinds = {}
    trace = []
    queue = list(range(len(convs)))

    def fail(kind):
        with lock:
            errors[0] += 1
            error_kinds[kind] = error_kinds.get(kind, 0) + 1

    def run_conversation(conv):
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=300)
        messages = [{"role": "system", "content": conv["system"]}]
        for turn in range(args.turns):
            messages.append({"role": "user", "content": text(conv["rng"], 40)})
            max_tokens = args.max_tokens
            if args.max_tokens_stddev > 0:
                max_tokens = max(1, round(conv["lengths"].gauss(args.max_tokens, args.max_tokens_stddev)))
            body = json.dumps({"model": args.model, "messages": messages, "stream": True,
                               "max_tokens": max_tokens, "temperature": 0,
                               "stream_options": {"include_usage": True}})
            t0 = time.perf_counter()
            first = second = None
            reply = []
            usage = None
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                r.read()
                fail(f"HTTP {r.status}")
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
                        elif second is None:
                            second = time.perf_counter()
                        reply.append(c)
            end = time.perf_counter()
            messages.append({"role": "assistant", "content": "".join(reply)})
            with lock:
                trace.append({"conversation": conv["index"], "prompt": conv["prompt"], "turn": turn,
                              "start_s": round(t0 - start, 4),
                              "ttft_ms": round((first - t0) * 1000, 2) if first else None,
                              # first to second streamed content chunk (a token each from
                              # either side's mocker): shows where a mocker puts a step's time
                              "second_token_ms": round((second - first) * 1000, 2) if second else None,
                              "latency_ms": round((end - t0) * 1000, 2),
                              "prompt_tokens": (usage or {}).get("prompt_tokens"),
                              "cached_tokens": ((usage or {}).get("prompt_tokens_details") or {})
                              .get("cached_tokens")})
                if first is not None:
                    ttfts.append((first - t0) * 1000)
                    latencies.append((end - t0) * 1000)
                    n = (usage or {}).get("completion_tokens") or 0
                    if n > 1:
                        itls.append((end - first) * 1000 / (n - 1))
                if usage:
                    prompt_tokens[0] += usage["prompt_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    cached_tokens[0] += details.get("cached_tokens") or 0
                    if conv["first"] is None:
                        conv["first"] = usage["prompt_tokens"]
                    conv["last"] = usage["prompt_tokens"]
                    conv["reply"] = usage.get("completion_tokens") or 0
            # Counted, not fatal: the conversation goes on with whatever came back.
            if first is None:
                fail("no content")
            if usage is None:
                fail("no usage")
            if args.think_ms > 0 and turn + 1 < args.turns:
                time.sleep(conv["think"].expovariate(1000.0 / args.think_ms))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            try:
                run_conversation(convs[i])
            except (OSError, http.client.HTTPException, ValueError) as e:
                # The rest of this conversation is lost; the others go on.
                fail(type(e).__name__)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if args.trace:
        with open(args.trace, "w") as f:
            for t in sorted(trace, key=lambda t: t["start_s"]):
                f.write(json.dumps(t) + "\n")
    # A system prompt's tokens: the shortest first turn that carried it (the user message and
    # the template add a few dozen). Distinct prompt tokens: each system prompt once, then per
    # conversation whatever its turns added after it (each turn's prompt extends the last one's).
    done = [c for c in convs if c["first"] is not None]
    sys_tokens = {}
    for c in done:
        sys_tokens[c["prompt"]] = min(sys_tokens.get(c["prompt"], c["first"]), c["first"])
    distinct = sum(sys_tokens.values()) + sum(c["last"] - sys_tokens[c["prompt"]] for c in done)
    print(json.dumps({
        **labels,
        "requests": len(ttfts), "errors": errors[0], "error_kinds": error_kinds,
        "seconds": round(elapsed, 1),
        "ttft_ms": {"p50": round(percentile(ttfts, 0.5), 1) if ttfts else None,
                    "p99": round(percentile(ttfts, 0.99), 1) if ttfts else None,
                    "mean": round(statistics.mean(ttfts), 1) if ttfts else None},
        "latency_ms_p50": round(percentile(latencies, 0.5), 1) if latencies else None,
        "itl_ms_mean": round(statistics.mean(itls), 2) if itls else None,
        "prefix_hit_rate": round(cached_tokens[0] / max(1, prompt_tokens[0]), 3),
        "prompt_tokens": prompt_tokens[0], "cached_tokens": cached_tokens[0],
        "system_prompt_tokens": round(statistics.mean(sys_tokens.values())) if sys_tokens else None,
        "working_set_tokens": distinct + sum(c["reply"] for c in done),
        "max_hit_rate": round(1 - distinct / max(1, prompt_tokens[0]), 3),
        "workload": {"system_prompts": args.system_prompts, "system_words": args.system_words,
                     "conversations": args.conversations, "turns": args.turns,
                     "concurrency": args.concurrency, "max_tokens": args.max_tokens, "max_tokens_stddev": args.max_tokens_stddev,
                     "think_ms": args.think_ms},
    }))


if __name__ == "__main__":
    main()
