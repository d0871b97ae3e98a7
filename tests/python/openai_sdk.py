"""Drives a running tandem frontend with the official `openai` SDK; exits non-zero on failure.

Run by tests/tests/frontend.rs with the venv scripts/test.sh creates.
"""
import argparse
import sys

import openai
from openai import OpenAI


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)

    models = [m.id for m in client.models.list()]
    assert args.model in models, models

    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=args.model, messages=msgs, max_tokens=6, seed=11)
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6, r.usage
    unary = r.choices[0].message.content

    stream = client.chat.completions.create(
        model=args.model, messages=msgs, max_tokens=6, seed=11, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == unary, (text, unary)
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 6, usage

    c = client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=5, n=2)
    assert len(c.choices) == 2 and all(ch.finish_reason == "length" for ch in c.choices), c
    assert c.usage.completion_tokens == 10, c.usage
    pieces = list(client.completions.create(model=args.model, prompt="Once", max_tokens=3, stream=True))
    assert any(p.choices and p.choices[0].finish_reason == "length" for p in pieces), pieces

    try:
        client.chat.completions.create(model="no-such-model", messages=msgs)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    try:
        client.chat.completions.create(model=args.model, messages=msgs, temperature=7)
        raise AssertionError("temperature 7 accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body

    print("openai sdk ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
