"""Per-request latency of streamed chat completions over kept-alive connections: by default
concurrency 1 over ONE connection (the case where Nagle's algorithm stalls Dynamo 1.6.1 by
~40 ms a request); `--concurrency N` runs N clients, each on its own connection.

Start a stack whose worker adds no delay, then run:
    WORKER_ARGS="--speedup-ratio 0" scripts/up.sh &
    python3 scripts/bench-frontend.py --url http://127.0.0.1:8000 --requests 300
Standard library only: one http.client connection reused for every request.
"""
import argparse
import json
import os
import statistics
import threading
import time

import http.client
import urllib.parse


def one_client(url, payload, n, warmup, lat, ttft, lock):
    """`warmup` + `n` requests over one kept-alive connection."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
    mine_lat, mine_ttft = [], []
    for i in range(n + warmup):
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
        if i >= warmup:
            mine_lat.append((t1 - t0) * 1000)
            mine_ttft.append((first - t0) * 1000)
    conn.close()
    with lock:
        lat.extend(mine_lat)
        ttft.extend(mine_ttft)


def cpu_seconds(pids):
    """CPU time the processes' threads have run, in seconds (schedstat: nanoseconds, much
    finer than utime's clock ticks). A CPU cost per request is far steadier than latency on a
    shared machine: it does not move with what other tenants run."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass  # a thread that ended in between
    return total / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="clients at once, each on its own kept-alive connection")
    ap.add_argument("--cpu-pids", default="",
                    help="comma-separated pids (frontend, worker, ...) whose CPU time per request to report")
    args = ap.parse_args()
    body = {"model": args.model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": args.max_tokens, "stream": True}
    payload = json.dumps(body)
    lat, ttft, lock = [], [], threading.Lock()
    c = max(1, args.concurrency)
    per = max(1, args.requests // c)
    warmup = max(1, 20 // c)
    # Warm-up first on every connection, then the timed part.
    threads = [threading.Thread(target=one_client, args=(args.url, payload, per, warmup, lat, ttft, lock))
               for _ in range(c)]
    pids = [int(p) for p in args.cpu_pids.split(",") if p]
    cpu0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - cpu0
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]
    print(json.dumps({
        "requests": len(lat), "max_tokens": args.max_tokens, "concurrency": c, "connections": c,
        "requests_per_s": round((per + warmup) * c / wall, 1),
        "latency_ms": {"p50": round(q(lat, 50), 2), "p90": round(q(lat, 90), 2), "p99": round(q(lat, 99), 2), "max": round(max(lat), 2)},
        "ttft_ms": {"p50": round(q(ttft, 50), 2), "p99": round(q(ttft, 99), 2)},
        **({"cpu_us_per_request": round(cpu * 1e6 / ((per + warmup) * c), 1)} if pids else {}),
    }))


if __name__ == "__main__":
    main()
