"""Load for the disaggregation benchmark: chat streams plus long prompts arriving alongside.

`--chat` client threads each send a short streamed chat completion (`--chat-tokens` out) again
and again; `--long` threads each send a long prompt (`--long-words` words, `--long-tokens` out)
every `--long-every` seconds. Measures, for `--seconds`: chat inter-token latency as aiperf
defines it ((last chunk - first chunk) / (chunks - 1) per request), the longest gap between two
chunks of a chat stream (the stall a long prompt causes), chat TTFT and long-prompt TTFT.
Prints one JSON line. Standard library only.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def stream(url, body):
    """Returns (ttft, [gaps]) of one streamed request."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {r.read()[:200]!r}")
    times = []
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b"data: ") and b'"content"' in line:
            times.append(time.perf_counter())
    conn.close()
    if not times:
        raise RuntimeError("no content chunk")
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])]


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))] * 1000 if v else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--chat", type=int, default=16)
    ap.add_argument("--chat-tokens", type=int, default=64)
    ap.add_argument("--long", type=int, default=2)
    ap.add_argument("--long-words", type=int, default=1500)
    ap.add_argument("--long-tokens", type=int, default=16)
    ap.add_argument("--long-every", type=float, default=1.0)
    args = ap.parse_args()
    deadline = time.perf_counter() + args.seconds
    lock = threading.Lock()
    res = {"chat_ttft": [], "chat_itl": [], "chat_stall": [], "long_ttft": [], "errors": 0,
           "chat": 0, "long": 0, "first_error": None}

    def chat_loop(i):
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            body = {"model": args.model, "stream": True, "max_tokens": args.chat_tokens,
                    "messages": [{"role": "user", "content": f"Client {i} question {n}: tell me about rivers."}]}
            try:
                ttft, gaps = stream(args.url, body)
            except Exception as e:
                with lock:
                    res["errors"] += 1
                    res["first_error"] = res["first_error"] or str(e)
                continue
            with lock:
                res["chat"] += 1
                res["chat_ttft"].append(ttft)
                if gaps:
                    res["chat_itl"].append(sum(gaps) / len(gaps))
                    res["chat_stall"].append(max(gaps))

    def long_loop(i):
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            words = " ".join(f"w{(i * 7919 + n * 104729 + k) % 9973}" for k in range(args.long_words))
            body = {"model": args.model, "stream": True, "max_tokens": args.long_tokens,
                    "messages": [{"role": "user", "content": words}]}
            t = time.perf_counter()
            try:
                ttft, _ = stream(args.url, body)
            except Exception as e:
                with lock:
                    res["errors"] += 1
                    res["first_error"] = res["first_error"] or str(e)
                time.sleep(args.long_every)
                continue
            with lock:
                res["long"] += 1
                res["long_ttft"].append(ttft)
            time.sleep(max(0.0, args.long_every - (time.perf_counter() - t)))

    threads = [threading.Thread(target=chat_loop, args=(i,)) for i in range(args.chat)]
    threads += [threading.Thread(target=long_loop, args=(i,)) for i in range(args.long)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({
        "chat_requests": res["chat"], "long_requests": res["long"], "errors": res["errors"],
        "chat_itl_p50_ms": pct(res["chat_itl"], 50), "chat_itl_p99_ms": pct(res["chat_itl"], 99),
        "chat_stall_p50_ms": pct(res["chat_stall"], 50), "chat_stall_p99_ms": pct(res["chat_stall"], 99),
        "chat_ttft_p50_ms": pct(res["chat_ttft"], 50), "chat_ttft_p99_ms": pct(res["chat_ttft"], 99),
        "long_ttft_p50_ms": pct(res["long_ttft"], 50), "long_ttft_p99_ms": pct(res["long_ttft"], 99),
        "first_error": res["first_error"],
    }))


if __name__ == "__main__":
    main()
