"""Turns the runs of scripts/bench-router.sh into one markdown table.

Reads OUT/raw/<regime>-<side>-<router>.json (one JSON line each from scripts/bench-router.py,
labelled by the script with regime, side, router, kv_blocks and block_size) and OUT/raw/meta.txt;
writes OUT/summary.md: the machine and commands, each regime's workload size against the
per-worker cache, and one row per regime, side and router with the KV router's TTFT p50 gain
over round-robin on the same side. With --update FILE, the summary also replaces what sits
between the "router regimes" markers of FILE. Standard library only.

    python3 scripts/bench_router_report.py OUT [--update docs/benchmarks.md]
"""
import argparse
import json
import pathlib
import sys

from bench_report import update_between

BEGIN = "<!-- router regimes: begin -->"
END = "<!-- router regimes: end -->"
SIDES = {"tandem": "tandem", "dynamo": "Dynamo 1.6.1"}
ROUTERS = ("kv", "round-robin")


def ms(v):
    return "—" if v is None else f"{v:,.1f} ms"


def kilo(tokens):
    return f"{tokens / 1000:,.1f} k"


def load(raw):
    runs = []
    for p in sorted(raw.glob("*.json")):
        line = p.read_text().strip().splitlines()
        if line:
            runs.append(json.loads(line[-1]))
    return runs


def output_tokens(w):
    """Each turn's max_tokens: fixed, or drawn around it (bench-router.py --max-tokens-stddev)."""
    sd = w.get("max_tokens_stddev") or 0
    if sd:
        return f"output lengths drawn around {w['max_tokens']} tokens (normal, σ {sd:g})"
    return f"{w['max_tokens']} output tokens"


def regime_line(name, rows):
    """The workload's size in tokens against one worker's cache and the four together."""
    r = next((x for x in rows if x.get("system_prompt_tokens")), rows[0])
    blocks, bs = int(r["kv_blocks"]), int(r["block_size"])
    workers = int(r.get("workers", 4))
    cache = blocks * bs
    w = r["workload"]
    prompts = (r.get("system_prompt_tokens") or 0) * w["system_prompts"]
    ws = r.get("working_set_tokens") or 0
    line = (f"**{name}**: {blocks:,} blocks × {bs} = {cache:,} tokens per worker ({workers} workers: "
            f"{cache * workers:,}); {w['system_prompts']} system prompts of {w['system_words']:,} words "
            f"≈ {r.get('system_prompt_tokens') or 0:,} tokens each (first turn), together {kilo(prompts)} "
            f"= {prompts / cache:.2f}× one worker's cache, {prompts / (cache * workers):.2f}× all {workers}; "
            f"with the conversations' histories ≈ {kilo(ws)} = {ws / cache:.2f}× one worker, "
            f"{ws / (cache * workers):.2f}× all; {w['conversations']} conversations × {w['turns']} turns, "
            f"concurrency {w['concurrency']}, {output_tokens(w)}; "
            f"highest possible hit rate ≈ {r.get('max_hit_rate', 0):.3f}.")
    # Both sides' token counts should agree (same tokenizer and chat template); say so if not.
    counts = {x["side"]: x.get("system_prompt_tokens") for x in rows if x.get("system_prompt_tokens")}
    if len(set(counts.values())) > 1:
        line += " Prompt tokens per side differ: " + ", ".join(f"{s} {n:,}" for s, n in counts.items()) + "."
    return line


def summary(runs, meta):
    lines = [f"- {m}" for m in meta.strip().splitlines()] + [""] if meta.strip() else []
    regimes = sorted({r["regime"] for r in runs}, key=lambda g: min(int(r["kv_blocks"]) for r in runs if r["regime"] == g))
    for g in regimes:
        lines.append("- " + regime_line(g, [r for r in runs if r["regime"] == g]))
    lines += [
        "",
        "TTFT from the client; hit rate = cached ÷ prompt tokens from each answer's `usage` "
        "(`prompt_tokens_details.cached_tokens`, filled in by either side's mocker from its cache). "
        "kv gain = round-robin TTFT p50 ÷ kv TTFT p50 on the same side: above 1× the KV router is faster.",
        "",
        "| regime | side | router | TTFT p50 | TTFT p99 | TTFT mean | prefix hit rate | kv gain (p50, rr ÷ kv) | requests | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in regimes:
        for side in SIDES:
            by_router = {r["router"]: r for r in runs if r["regime"] == g and r["side"] == side}
            rr = (by_router.get("round-robin") or {}).get("ttft_ms", {}).get("p50")
            for router in ROUTERS:
                r = by_router.get(router)
                if not r:
                    continue
                t = r["ttft_ms"]
                gain = "—"
                if router == "kv" and rr and t.get("p50"):
                    gain = f"**{rr / t['p50']:.2f}×**"
                elif router == "round-robin" and rr:
                    gain = "1.00×"
                lines.append(f"| {g} | {SIDES[side]} | {router} | {ms(t.get('p50'))} | {ms(t.get('p99'))} "
                             f"| {ms(t.get('mean'))} | {r['prefix_hit_rate']:.3f} | {gain} | {r['requests']} "
                             f"| {r['errors']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--update")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    runs = load(out / "raw")
    if not runs:
        print(f"no runs under {out / 'raw'}", file=sys.stderr)
        return 1
    meta_file = out / "raw" / "meta.txt"
    text = summary(runs, meta_file.read_text() if meta_file.exists() else "")
    (out / "summary.md").write_text(text)
    print(text)
    if args.update:
        update_between(pathlib.Path(args.update), BEGIN, END, text,
                       "### KV router regimes beside Dynamo 1.6.1 (issue 17, goal 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
