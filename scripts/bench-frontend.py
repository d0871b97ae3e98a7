"""Per-request latency of streamed chat completions at concurrency 1 over ONE kept-alive
connection (the case where Nagle's algorithm stalls Dynamo 1.6.1 by ~40 ms a request).

Start a stack whose worker adds no delay, then run:
    WORKER_ARGS="--speedup-ratio 0" scripts/up.sh &
    python3 scripts/bench-frontend.py --url http://127.0.0.1:8000 --requests 300
Standard library only: one http.client connection reused for every request.
"""
import argparse
import json
import statistics
import time

import http.client
import urllib.parse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    body = {"model": args.model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": args.max_tokens, "stream": True}
    lat, ttft = [], []
    u = urllib.parse.urlparse(args.url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
    payload = json.dumps(body)
    for i in range(args.requests + 20):
        t0 = time.perf_counter()
        first = None
        conn.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.status
        while True:
            line = r.readline()
            if line.startswith(b"data: ") and first is None:
                first = time.perf_counter()
            if not line or line.startswith(b"data: [DONE]"):
                break
        r.read()  # the end of the chunked body, so the connection can be reused
        t1 = time.perf_counter()
        if i >= 20:  # warm-up
            lat.append((t1 - t0) * 1000)
            ttft.append((first - t0) * 1000)
    conn.close()
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]
    print(json.dumps({
        "requests": len(lat), "max_tokens": args.max_tokens, "concurrency": 1, "connections": 1,
        "latency_ms": {"p50": round(q(lat, 50), 2), "p90": round(q(lat, 90), 2), "p99": round(q(lat, 99), 2), "max": round(max(lat), 2)},
        "ttft_ms": {"p50": round(q(ttft, 50), 2), "p99": round(q(ttft, 99), 2)},
    }))


if __name__ == "__main__":
    main()
