"""Turns the aiperf runs of scripts/bench.sh into a table and plots.

Reads OUT/raw/<side>-<engine>-<workload>-c<concurrency>/profile_export_aiperf.json (aiperf's
summary export) and OUT/raw/meta.txt; writes OUT/summary.md (one row per workload and
concurrency, tandem beside Dynamo when the peer ran, with the ratio) and OUT/<engine>-<workload>.png
(TTFT p50, ITL p50 and request throughput against concurrency, one line per side). With
--update FILE, the summary also replaces what sits between the "aiperf suite" markers of FILE.

    python scripts/bench_report.py OUT [--update docs/benchmarks.md]
"""
import argparse
import json
import pathlib
import re
import sys

BEGIN = "<!-- aiperf suite: begin (scripts/bench.sh writes this part) -->"
END = "<!-- aiperf suite: end -->"
RUN = re.compile(r"^(tandem|dynamo)-(mocker|candle)-(.+)-c(\d+)$")


def metric(d, name, stat):
    v = d.get(name) or {}
    return v.get(stat)


def load(raw):
    runs = {}
    for p in sorted(raw.iterdir()):
        m = RUN.match(p.name)
        f = p / "profile_export_aiperf.json"
        if not m or not f.exists():
            continue
        side, engine, workload, c = m.group(1), m.group(2), m.group(3), int(m.group(4))
        d = json.loads(f.read_text())
        runs[(side, engine, workload, c)] = {
            "rps": metric(d, "request_throughput", "avg"),
            "tok_s": metric(d, "output_token_throughput", "avg"),
            "ttft50": metric(d, "time_to_first_token", "p50"),
            "ttft99": metric(d, "time_to_first_token", "p99"),
            "itl50": metric(d, "inter_token_latency", "p50"),
            "lat50": metric(d, "request_latency", "p50"),
            "lat99": metric(d, "request_latency", "p99"),
            "cached": metric(d, "overall_usage_prompt_cache_read_pct", "avg"),
            "errors": metric(d, "request_error_rate", "avg") or 0.0,
            "count": metric(d, "completed_request_count", "avg"),
        }
    return runs


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def ratio(a, b, higher_is_better=True):
    if a is None or b is None or a == 0 or b == 0:
        return "—"
    return f"{(a / b) if higher_is_better else (b / a):.2f}×"


def summary(runs, meta):
    lines = []
    if meta:
        lines += [f"- {line}" for line in meta.strip().splitlines()]
        lines.append("")
    keys = sorted({(e, w, c) for (_, e, w, c) in runs})
    peer = any(s == "dynamo" for (s, _, _, _) in runs)
    if peer:
        lines.append("Ratios are tandem ÷ Dynamo for throughput and Dynamo ÷ tandem for latencies: above 1× means tandem is better.")
        lines.append("")
        lines.append("| engine | workload | concurrency | req/s tandem | req/s Dynamo | ratio | TTFT p50 ms tandem | Dynamo | ratio | ITL p50 ms tandem | Dynamo | ratio | latency p99 ms tandem | Dynamo | prompt cached % tandem | Dynamo |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        lines.append("| engine | workload | concurrency | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | latency p50 ms | latency p99 ms | prompt cached % | errors % |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (e, w, c) in keys:
        t = runs.get(("tandem", e, w, c), {})
        if peer:
            d = runs.get(("dynamo", e, w, c), {})
            lines.append(
                f"| {e} | {w} | {c} | {fmt(t.get('rps'))} | {fmt(d.get('rps'))} | {ratio(t.get('rps'), d.get('rps'))} "
                f"| {fmt(t.get('ttft50'), 2)} | {fmt(d.get('ttft50'), 2)} | {ratio(t.get('ttft50'), d.get('ttft50'), False)} "
                f"| {fmt(t.get('itl50'), 2)} | {fmt(d.get('itl50'), 2)} | {ratio(t.get('itl50'), d.get('itl50'), False)} "
                f"| {fmt(t.get('lat99'), 1)} | {fmt(d.get('lat99'), 1)} | {fmt(t.get('cached'), 0)} | {fmt(d.get('cached'), 0)} |"
            )
        else:
            lines.append(
                f"| {e} | {w} | {c} | {fmt(t.get('rps'))} | {fmt(t.get('tok_s'))} | {fmt(t.get('ttft50'), 2)} "
                f"| {fmt(t.get('ttft99'), 2)} | {fmt(t.get('itl50'), 2)} | {fmt(t.get('lat50'), 1)} | {fmt(t.get('lat99'), 1)} "
                f"| {fmt(t.get('cached'), 0)} | {fmt(t.get('errors'), 1)} |"
            )
    return "\n".join(lines) + "\n"


def plots(runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for (e, w) in sorted({(e, w) for (_, e, w, _) in runs}):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for side, style in (("tandem", "o-"), ("dynamo", "s--")):
            pts = sorted((c, r) for (s, e2, w2, c), r in runs.items() if s == side and e2 == e and w2 == w)
            if not pts:
                continue
            cs = [c for c, _ in pts]
            for ax, key, label in zip(
                axes,
                ("ttft50", "itl50", "rps"),
                ("TTFT p50 (ms)", "ITL p50 (ms)", "requests/s"),
            ):
                ax.plot(cs, [r[key] for _, r in pts], style, label="tandem" if side == "tandem" else "Dynamo 1.6.1")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("concurrency")
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
        for ax in axes:
            ax.legend()
        fig.suptitle(f"aiperf, streamed chat, {e} worker, {w} workload")
        fig.tight_layout()
        path = out / f"{e}-{w}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path.name)
    return made


def update_between(doc, begin, end, text, heading):
    """Puts `text` between the markers `begin` and `end` of the file `doc`; without them, appends
    `heading` and the marked text at the end. (scripts/bench_router_report.py uses it too.)"""
    body = doc.read_text()
    block = f"{begin}\n{text}{end}"
    if begin in body and end in body:
        body = body[: body.index(begin)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    doc.write_text(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--update")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    runs = load(out / "raw")
    if not runs:
        print(f"no aiperf runs under {out / 'raw'}", file=sys.stderr)
        return 1
    meta_file = out / "raw" / "meta.txt"
    meta = meta_file.read_text() if meta_file.exists() else ""
    text = summary(runs, meta)
    pngs = plots(runs, out)
    text += "\n" + "\n".join(f"![{p}](bench/{p})" for p in pngs) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    if args.update:
        update_between(pathlib.Path(args.update), BEGIN, END, text, "## aiperf suite (scripts/bench.sh)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
