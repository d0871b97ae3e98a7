"""Soak client: N concurrent streamed chat completions, each client on its own kept-alive
HTTP/1.1 connection, for a fixed time; every answer is checked (status 200, no `event: error`,
`[DONE]`, usage counting exactly max_tokens) and the summary is one JSON object.

    python3 scripts/soak.py --url http://127.0.0.1:8000 --concurrency 1000 --duration 60

Standard library only (asyncio streams, a small chunked-encoding reader).
"""
import argparse
import asyncio
import json
import statistics
import time
import urllib.parse


class Stats:
    def __init__(self):
        self.latency = []
        self.errors = {}
        self.tokens = 0

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def read_chunked(reader):
    """The whole chunked body."""
    body = bytearray()
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise ConnectionError("connection closed mid-body")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readline()  # the CRLF after the last chunk (no trailers)
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def one_request(reader, writer, host, payload, max_tokens, stats):
    t0 = time.perf_counter()
    writer.write(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        + payload
    )
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = await read_chunked(reader)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    if status != 200:
        stats.error(f"status {status}")
        return
    text = body.decode()
    if "event: error" in text:
        stats.error("stream error event")
        return
    if "data: [DONE]" not in text:
        stats.error("no [DONE]")
        return
    usage = None
    for line in text.splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            u = json.loads(line[6:]).get("usage")
            if u:
                usage = u
    if not usage or usage.get("completion_tokens") != max_tokens:
        stats.error(f"usage {usage and usage.get('completion_tokens')}")
        return
    stats.tokens += usage["completion_tokens"]
    stats.latency.append((time.perf_counter() - t0) * 1000)


async def client(i, url, max_tokens, deadline, stats):
    u = urllib.parse.urlparse(url)
    payload = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Soak request from client {i}."}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    conn = None
    while time.monotonic() < deadline:
        try:
            if conn is None:
                conn = await asyncio.open_connection(u.hostname, u.port)
            await one_request(*conn, u.hostname, payload, max_tokens, stats)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError) as e:
            stats.error(type(e).__name__)
            if conn:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.1)
    if conn:
        conn[1].close()


def pct(xs, p):
    return round(statistics.quantiles(xs, n=100)[p - 1], 1) if len(xs) > 1 else None


async def main():
    global MODEL
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    MODEL = a.model
    stats = Stats()
    started = time.monotonic()
    deadline = started + a.duration
    await asyncio.gather(
        *(client(i, a.url, a.max_tokens, deadline, stats) for i in range(a.concurrency))
    )
    took = time.monotonic() - started
    ok = len(stats.latency)
    print(
        json.dumps(
            {
                "concurrency": a.concurrency,
                "duration_s": round(took, 1),
                "requests_ok": ok,
                "errors": sum(stats.errors.values()),
                "errors_by_kind": stats.errors,
                "requests_per_s": round(ok / took, 1),
                "tokens_per_s": round(stats.tokens / took, 1),
                "latency_ms": {"p50": pct(stats.latency, 50), "p99": pct(stats.latency, 99)},
            }
        )
    )


MODEL = "SmolLM2-135M-Instruct"
if __name__ == "__main__":
    asyncio.run(main())
