"""The rest of the OpenAI surface through the official SDK, against the real engine serving
the bundled model: logprobs, structured output, tool calls, reasoning, the Responses API.
Exits non-zero on the first failure; prints one line per part that passed.

Run by tests/tests/surface.rs (worker started with --dyn-tool-call-parser hermes and
--dyn-reasoning-parser basic) with the venv scripts/test.sh creates.
"""
import argparse
import json
import math
import sys

import jsonschema
import pydantic
from openai import OpenAI

Q = [{"role": "user", "content": "What is the capital of France?"}]


def logprobs(client, model):
    kw = dict(model=model, messages=Q, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    for t in content:
        tops = t.top_logprobs
        assert len(tops) == 5, tops
        lps = [a.logprob for a in tops]
        assert lps == sorted(lps, reverse=True), lps
        # Greedy: the chosen token is the most likely one.
        assert t.token == tops[0].token and abs(t.logprob - lps[0]) < 1e-6, (t, tops)
        assert t.logprob <= 0 and sum(math.exp(x) for x in lps) <= 1 + 1e-4, lps
        assert bytes(t.bytes) == t.token.encode(), t
    if c.finish_reason == "length":
        assert "".join(t.token for t in content) == c.message.content, (content, c.message)
    # Streamed: the same tokens and logprobs, each with the chunk of its text.
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            if ch.logprobs and ch.logprobs.content:
                streamed.extend(ch.logprobs.content)
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in content
    ], (streamed, content)
    # Completions: the legacy columns.
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6, lp
    assert "".join(lp.tokens) == r.choices[0].text, (lp.tokens, r.choices[0].text)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, lp.text_offset
    for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and abs(max(top.values()) - l) < 1e-6, (tok, l, top)
    print("logprobs ok")


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 20}, "eu": {"type": "boolean"}},
                "required": ["name", "eu"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "answer": {"enum": ["Paris", "Lyon", "Nice"]},
            "confidence": {"enum": ["low", "medium", "high"]},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "cities": {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 1, "maxItems": 3},
            "populations": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99999999}, "maxItems": 3},
        },
        "required": ["cities", "populations"],
        "additionalProperties": False,
    },
    "required_fields": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "maxLength": 30},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "mixed": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 1000},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "meta": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["ok"],
                "additionalProperties": False,
            },
        },
        "required": ["id", "tags", "meta"],
        "additionalProperties": False,
    },
}


def structured(client, model):
    msgs = [{"role": "user", "content": "Describe the capital of France as JSON."}]
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        kw = dict(model=model, messages=msgs, max_tokens=160, n=2, temperature=0.8, seed=5, response_format=fmt)
        r = client.chat.completions.create(**kw)
        assert len(r.choices) == 2
        for c in r.choices:
            assert c.finish_reason == "stop", (name, c)
            jsonschema.validate(json.loads(c.message.content), schema)
        texts, finish = ["", ""], [None, None]
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish[c.index]
        assert finish == ["stop", "stop"], (name, finish, texts)
        for t in texts:
            jsonschema.validate(json.loads(t), schema)
    # The SDK's own parse helper: a pydantic model in, a parsed object out.
    class Capital(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=20)
        population_millions: int = pydantic.Field(ge=0, le=100)

    r = client.chat.completions.parse(model=model, messages=msgs, max_tokens=80, response_format=Capital)
    assert isinstance(r.choices[0].message.parsed, Capital), r
    # json_object, and a bad schema refused with the field named.
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=120, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    try:
        client.chat.completions.create(
            model=model, messages=msgs, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )
        raise AssertionError("a bad schema was accepted")
    except Exception as e:  # openai.BadRequestError
        assert getattr(e, "status_code", None) == 400, e
        assert e.body["param"] == "response_format.json_schema.schema", e.body
    print("structured output ok")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def tools(client, model):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(
        model=model, messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, max_tokens=120,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None and len(c.message.tool_calls) == 1, c.message
    call = c.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function", call
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    # A named tool, streamed: the SDK reassembles the deltas.
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(
        model=model, messages=msgs, tools=[WEATHER, TIME], tool_choice=named, max_tokens=120,
    ) as s:
        final = s.get_final_completion()
    c = final.choices[0]
    assert c.finish_reason == "tool_calls", c
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather", call
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_weather"])
    # The call and its result in the history render through the template.
    history = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    r = client.chat.completions.create(model=model, messages=history, max_tokens=8)
    assert r.choices[0].message.content, r
    # auto with the worker's Hermes parser: the model's <tool_call> block (forced here with a
    # regex, since the bundled model was never trained on tools) comes back as a call.
    call_text = '<tool_call>\\{"name": "get_time", "arguments": \\{"zone": "(UTC|CET)"\\}\\}</tool_call>'
    r = client.chat.completions.create(
        model=model, messages=msgs, tools=[WEATHER, TIME], max_tokens=60,
        extra_body={"guided_regex": "Checking\\. " + call_text},
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content == "Checking. ", c.message
    assert c.message.tool_calls[0].function.name == "get_time", c.message
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), PARAMS["get_time"])
    print("tool calls ok")


def reasoning(client, model):
    # The worker runs --dyn-reasoning-parser basic; a regex makes the bundled model think aloud.
    kw = dict(
        model=model, messages=Q, max_tokens=60,
        extra_body={"guided_regex": "<think>[a-z ]{5,30}</think>[A-Z][a-z ]{3,20}\\."},
    )
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    thought = m.model_extra.get("reasoning_content")
    assert thought and "<think>" not in m.content and "</think>" not in (thought + m.content), m
    parts = {"reasoning": "", "content": ""}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            parts["reasoning"] += (c.delta.model_extra or {}).get("reasoning_content") or ""
            parts["content"] += c.delta.content or ""
    assert parts == {"reasoning": thought, "content": m.content}, (parts, m)
    print("reasoning ok")


def responses(client, model):
    r = client.responses.create(model=model, input="What is the capital of France?", max_output_tokens=12)
    assert r.object == "response" and r.output_text, r
    assert r.status in ("completed", "incomplete"), r
    assert r.usage.output_tokens <= 12 and r.usage.input_tokens > 0, r.usage
    # Streamed: the documented event sequence, text deltas adding up to the final text.
    kinds, text, final = [], "", None
    with client.responses.stream(model=model, input="What is the capital of France?", max_output_tokens=12) as s:
        for ev in s:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
        final = s.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds, kinds
    assert text == final.output_text, (text, final)
    # Function tools: a forced call comes back as a function_call item.
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    r = client.responses.create(
        model=model, input="Weather in Paris?", tools=[tool], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=100,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) >= 1 and calls[0].name == "get_weather", r.output
    jsonschema.validate(json.loads(calls[0].arguments), PARAMS["get_weather"])
    # ... and its output goes back in as input.
    r = client.responses.create(
        model=model, max_output_tokens=8,
        input=[{"role": "user", "content": "Weather in Paris?"}, calls[0].model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18C"}],
    )
    assert r.output_text, r
    print("responses ok")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    for part in (logprobs, structured, tools, reasoning, responses):
        if not args.only or part.__name__ == args.only:
            part(client, args.model)
    print("openai surface ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
