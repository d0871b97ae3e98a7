"""Streams a chat completion from a worker that fails mid-stream; the official `openai` SDK
must raise on the SSE `error` event instead of ending the stream normally. Prints
`sdk raised: <message>` and exits 0 when it does.

Run by tests/tests/request_path.rs with the venv scripts/test.sh creates.
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
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=20,
        stream=True,
    )
    text = ""
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                print(f"stream finished normally: {chunk.choices[0].finish_reason}")
                return 1
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    except openai.APIError as e:
        if not text:
            print("the error came before any token")
            return 1
        print(f"sdk raised: {e}")
        return 0
    print("the stream ended without an error")
    return 1


if __name__ == "__main__":
    sys.exit(main())
