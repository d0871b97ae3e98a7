//! Property test of `prepare` (fields, validation, chat template, tokenization): no body a
//! client can send makes it panic, and every refusal is a 4xx with OpenAI's envelope fields.
//!
//! Bodies are generated around the real request shape — the fields OpenAI, vLLM and Dynamo
//! define, each with values of every JSON type (extreme numbers, odd strings, nested
//! containers), messages with real and made-up roles and content parts — so most cases get
//! past the first check and reach the deeper stages. A fixed number of cases (`FUZZ_CASES`,
//! default 512) keeps the run bounded in CI; `FUZZ_CASES=100000 cargo test -p tandem-frontend
//! fuzz` runs longer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Any JSON value, small and deep enough to matter.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            any::<f64>(),
            Just(0.0),
            Just(-0.0),
            Just(1e308),
            Just(-1e-308),
            Just(2.0000001)
        ]
        .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (-3i64..200).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("user"),
            Just("system"),
            Just("assistant"),
            Just("tool"),
            Just("developer"),
            Just("function"),
            Just("text"),
            Just("auto"),
            Just("none"),
            Just("<|im_start|>"),
            Just("{{ raise_exception('x') }}"),
            Just("\u{0}\u{ffff}\u{10ffff}"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Field names requests use, plus unknown ones.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "model",
            "messages",
            "prompt",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "stream",
            "stream_options",
            "include_usage",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "tools",
            "tool_choice",
            "response_format",
            "user",
            "top_k",
            "min_p",
            "min_tokens",
            "ignore_eos",
            "repetition_penalty",
            "nvext",
            "backend_instance_id",
            "role",
            "content",
            "type",
            "text",
            "name",
            "tool_call_id",
            "echo",
            "best_of",
            "suffix",
            "metadata",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,12}",
    ]
}

/// A message: mostly well-formed, with any value where it matters.
fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        prop::sample::select(vec!["user", "system", "assistant", "tool", "developer"])
            .prop_map(Value::from),
        any_json(),
    ];
    let content = prop_oneof![
        ".{0,60}".prop_map(Value::from),
        prop::collection::vec(
            prop_oneof![
                ".{0,20}".prop_map(|t| json!({"type": "text", "text": t})),
                any_json(),
            ],
            0..3
        )
        .prop_map(Value::Array),
        any_json(),
    ];
    (role, content, proptest::option::of(any_json())).prop_map(|(role, content, extra)| {
        let mut m = json!({"role": role, "content": content});
        if let Some(x) = extra {
            m["tool_call_id"] = x;
        }
        m
    })
}

/// A request body: the model and a message list or prompt, then any of the known fields.
fn body() -> impl Strategy<Value = Value> {
    let base = prop_oneof![
        prop::collection::vec(message(), 0..4).prop_map(|m| json!({"model": "m", "messages": m})),
        any_json().prop_map(|p| json!({"model": "m", "prompt": p})),
        ".{0,40}".prop_map(|p| json!({"model": "m", "prompt": p})),
        prop::collection::vec(any::<i64>(), 0..6).prop_map(|p| json!({"model": "m", "prompt": p})),
        any_json(),
    ];
    (base, prop::collection::vec((key(), any_json()), 0..5)).prop_map(|(mut b, extra)| {
        if let Some(obj) = b.as_object_mut() {
            for (k, v) in extra {
                obj.insert(k, v);
            }
        }
        b
    })
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn no_body_panics_and_every_refusal_is_a_4xx_envelope(body in body(), as_chat in any::<bool>()) {
        let view = crate::pipeline::test_model::view();
        let result = common(&body).and_then(|c| {
            if as_chat { chat(&view, &body, &c) } else { completion(&view, &body, &c) }
        });
        match result {
            Ok(p) => {
                prop_assert!(!p.request.token_ids.is_empty() || !as_chat);
                prop_assert!(p.n() >= 1);
            }
            Err(e) => {
                prop_assert!(e.status.is_client_error(), "{} for {body}: {}", e.status, e.message);
                prop_assert!(!e.message.is_empty());
                let env = serde_json::to_value(e.body()).unwrap();
                prop_assert!(env["error"]["type"].is_string());
            }
        }
    }
}

/// The generator reaches past the first check: some bodies are accepted whole (template and
/// tokenizer included) and the refusals name many different fields.
#[test]
fn generated_bodies_reach_every_stage() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let view = crate::pipeline::test_model::view();
    let mut runner = TestRunner::deterministic();
    let (mut ok, mut params) = (0, std::collections::BTreeSet::new());
    for i in 0..1000 {
        let body = body().new_tree(&mut runner).unwrap().current();
        let result = common(&body).and_then(|c| {
            if i % 2 == 0 {
                chat(&view, &body, &c)
            } else {
                completion(&view, &body, &c)
            }
        });
        match result {
            Ok(_) => ok += 1,
            Err(e) => {
                params.insert(e.param.unwrap_or_default());
            }
        }
    }
    println!(
        "{ok} of 1000 accepted; refusals name {} fields",
        params.len()
    );
    assert!(ok >= 20, "only {ok} of 1000 accepted");
    assert!(params.len() >= 10, "refusals name only {params:?}");
}
