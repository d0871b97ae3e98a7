//! `prepare` as a table: request bodies, and the status and OpenAI `param` each must get.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::pipeline::test_model::CONTEXT;
use serde_json::json;

#[derive(Clone, Copy, Debug)]
enum Ep {
    Chat,
    Cmpl,
}

fn run(ep: Ep, body: Value) -> Result<Prepared, ApiError> {
    let view = crate::pipeline::test_model::view();
    let c = common(&body)?;
    match ep {
        Ep::Chat => chat(&view, &body, &c),
        Ep::Cmpl => completion(&view, &body, &c),
    }
}

fn chat_body(extra: Value) -> Value {
    let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn cmpl_body(extra: Value) -> Value {
    let mut b = json!({"model": "m", "prompt": "Once upon a time"});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[test]
fn invalid_requests_get_400_naming_the_field() {
    use Ep::*;
    let long = "word ".repeat(9000);
    // (case, endpoint, body, expected status, expected param)
    #[rustfmt::skip]
    let table: Vec<(&str, Ep, Value, u16, Option<&str>)> = vec![
        ("not an object", Chat, json!([1, 2]), 400, None),
        ("no model", Chat, json!({"messages": []}), 400, Some("model")),
        ("no messages", Chat, json!({"model": "m"}), 400, Some("messages")),
        ("empty messages", Chat, chat_body(json!({"messages": []})), 400, Some("messages")),
        ("unknown role", Chat, chat_body(json!({"messages": [{"role": "robot", "content": "x"}]})), 400, Some("messages[0].role")),
        ("user without content", Chat, chat_body(json!({"messages": [{"role": "user"}]})), 400, Some("messages[0].content")),
        ("user with null content", Chat, chat_body(json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": null}]})), 400, Some("messages[1].content")),
        ("tool without id", Chat, chat_body(json!({"messages": [{"role": "tool", "content": "42"}]})), 400, Some("messages[0].tool_call_id")),
        ("image part", Chat, chat_body(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})), 400, Some("messages[0].content[0]")),
        ("content number", Chat, chat_body(json!({"messages": [{"role": "user", "content": 5}]})), 400, Some("messages[0].content")),
        ("max_tokens string", Chat, chat_body(json!({"max_tokens": "ten"})), 400, Some("max_tokens")),
        ("max_tokens 0", Chat, chat_body(json!({"max_tokens": 0})), 400, Some("max_tokens")),
        ("max_completion_tokens 0", Chat, chat_body(json!({"max_completion_tokens": 0})), 400, Some("max_completion_tokens")),
        ("temperature", Chat, chat_body(json!({"temperature": 2.5})), 400, Some("temperature")),
        ("top_p 0", Chat, chat_body(json!({"top_p": 0})), 400, Some("top_p")),
        ("top_k -2", Chat, chat_body(json!({"top_k": -2})), 400, Some("top_k")),
        ("min_p", Chat, chat_body(json!({"min_p": 1.5})), 400, Some("min_p")),
        ("presence_penalty", Chat, chat_body(json!({"presence_penalty": -3})), 400, Some("presence_penalty")),
        ("repetition_penalty", Chat, chat_body(json!({"repetition_penalty": 0})), 400, Some("repetition_penalty")),
        ("n 0", Chat, chat_body(json!({"n": 0})), 400, Some("n")),
        ("n 129", Chat, chat_body(json!({"n": 129})), 400, Some("n")),
        ("five stops", Chat, chat_body(json!({"stop": ["a", "b", "c", "d", "e"]})), 400, Some("stop")),
        ("empty stop", Chat, chat_body(json!({"stop": ""})), 400, Some("stop")),
        ("min over max", Chat, chat_body(json!({"min_tokens": 9, "max_tokens": 3})), 400, Some("min_tokens")),
        ("stream_options unstreamed", Chat, chat_body(json!({"stream_options": {"include_usage": true}})), 400, Some("stream_options")),
        ("user not a string", Chat, chat_body(json!({"user": 7})), 400, Some("user")),
        ("seed float", Chat, chat_body(json!({"seed": 1.5})), 400, Some("seed")),
        ("logit_bias key", Chat, chat_body(json!({"logit_bias": {"hello": 5}})), 400, Some("logit_bias")),
        ("logit_bias value", Chat, chat_body(json!({"logit_bias": {"42": 101}})), 400, Some("logit_bias")),
        ("logit_bias", Chat, chat_body(json!({"logit_bias": {"42": 5}})), 400, Some("logit_bias")),
        ("top_logprobs 21", Chat, chat_body(json!({"logprobs": true, "top_logprobs": 21})), 400, Some("top_logprobs")),
        ("top_logprobs alone", Chat, chat_body(json!({"top_logprobs": 2})), 400, Some("top_logprobs")),
        ("auto tools without a parser", Chat, chat_body(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})), 400, Some("tool_choice")),
        ("tool_choice without tools", Chat, chat_body(json!({"tool_choice": "required"})), 400, Some("tool_choice")),
        ("response_format type", Chat, chat_body(json!({"response_format": {"type": "xml"}})), 400, Some("response_format.type")),
        ("json_schema missing", Chat, chat_body(json!({"response_format": {"type": "json_schema"}})), 400, Some("response_format.json_schema")),
        ("json_schema name", Chat, chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}})), 400, Some("response_format.json_schema.name")),
        ("json_schema bad schema", Chat, chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})), 400, Some("response_format.json_schema.schema")),
        ("json_schema not an object", Chat, chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}})), 400, Some("response_format.json_schema.schema")),
        ("two grammars", Chat, chat_body(json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"})), 400, Some("guided_regex")),
        ("bad regex", Cmpl, cmpl_body(json!({"guided_regex": "(a"})), 400, Some("guided_regex")),
        ("bad lark", Cmpl, cmpl_body(json!({"nvext": {"guided_grammar": "start: ???"}})), 400, Some("nvext.guided_grammar")),
        ("guided_json text", Chat, chat_body(json!({"guided_json": "{not json"})), 400, Some("guided_json")),
        ("no choices", Chat, chat_body(json!({"guided_choice": []})), 400, Some("guided_choice")),
        ("grammar and ignore_eos", Chat, chat_body(json!({"guided_regex": "a+", "ignore_eos": true})), 400, Some("ignore_eos")),
        ("grammar and min_tokens", Cmpl, cmpl_body(json!({"response_format": {"type": "json_object"}, "min_tokens": 3})), 400, Some("min_tokens")),
        ("forced call and a format", Chat, chat_body(json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "response_format": {"type": "json_object"}})), 400, Some("response_format")),
        ("functions", Chat, chat_body(json!({"functions": [{"name": "f"}]})), 400, Some("functions")),
        ("audio", Chat, chat_body(json!({"modalities": ["text", "audio"]})), 400, Some("modalities")),
        ("reasoning_effort", Chat, chat_body(json!({"reasoning_effort": "low"})), 400, Some("reasoning_effort")),
        ("store", Chat, chat_body(json!({"store": true})), 400, Some("store")),
        ("structured_outputs", Chat, chat_body(json!({"structured_outputs": {"json": {}}})), 400, Some("structured_outputs")),
        ("nvext null is not set", Chat, chat_body(json!({"nvext": {"annotations": null, "use_raw_prompt": true}})), 400, Some("nvext.use_raw_prompt")),
        ("nvext annotations", Chat, chat_body(json!({"nvext": {"annotations": ["request_id"]}})), 400, Some("nvext.annotations")),
        ("nvext top_k", Chat, chat_body(json!({"nvext": {"top_k": -5}})), 400, Some("nvext.top_k")),
        ("context", Chat, chat_body(json!({"messages": [{"role": "user", "content": long}]})), 400, Some("messages")),
        ("max_tokens over context", Chat, chat_body(json!({"max_tokens": 9000})), 400, Some("messages")),
        ("negative token id", Cmpl, cmpl_body(json!({"prompt": [1, -2, 3]})), 400, Some("prompt")),
        ("token id outside vocab", Cmpl, cmpl_body(json!({"prompt": [1, 49152]})), 400, Some("prompt")),
        ("nested ids outside vocab", Cmpl, cmpl_body(json!({"prompt": [[1, 99999999]]})), 400, Some("prompt")),
        ("prompt batch", Cmpl, cmpl_body(json!({"prompt": ["a", "b"]})), 400, Some("prompt")),
        ("prompt object", Cmpl, cmpl_body(json!({"prompt": {"text": "a"}})), 400, Some("prompt")),
        ("empty prompt", Cmpl, cmpl_body(json!({"prompt": []})), 400, Some("prompt")),
        ("logprobs 6", Cmpl, cmpl_body(json!({"logprobs": 6})), 400, Some("logprobs")),
        ("best_of below n", Cmpl, cmpl_body(json!({"best_of": 1, "n": 2})), 400, Some("best_of")),
        ("best_of 3", Cmpl, cmpl_body(json!({"best_of": 3})), 400, Some("best_of")),
        ("echo", Cmpl, cmpl_body(json!({"echo": true})), 400, Some("echo")),
        ("suffix", Cmpl, cmpl_body(json!({"suffix": "end"})), 400, Some("suffix")),
        ("prompt over context", Cmpl, cmpl_body(json!({"prompt": long})), 400, Some("prompt")),
    ];
    for (case, ep, body, status, param) in table {
        let e = run(ep, body).expect_err(case);
        assert_eq!(e.status.as_u16(), status, "{case}: {e:?}");
        assert_eq!(e.param.as_deref(), param, "{case}: {e:?}");
        assert!(!e.message.is_empty(), "{case}");
    }
}

#[test]
fn valid_requests_become_engine_requests() {
    use Ep::*;
    #[rustfmt::skip]
    let table: Vec<(&str, Ep, Value)> = vec![
        ("plain chat", Chat, chat_body(json!({}))),
        ("every role", Chat, chat_body(json!({"messages": [ {"role": "developer", "content": "d"}, {"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": null, "tool_calls": []}, {"role": "tool", "content": "r", "tool_call_id": "c1"}]}))),
        ("sampling", Chat, chat_body(json!({"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": -3, "n": 3, "stop": ["\n"], "max_completion_tokens": 12, "presence_penalty": 0.5}))),
        ("off switches", Chat, chat_body(json!({"logprobs": false, "tool_choice": "none", "tools": [], "response_format": {"type": "text"}, "store": false, "modalities": ["text"], "user": "u1", "parallel_tool_calls": true, "metadata": {"k": "v"}, "service_tier": "auto"}))),
        ("unknown field", Chat, chat_body(json!({"some_future_field": {"x": 1}}))),
        ("vllm off-values", Chat, chat_body(json!({"skip_special_tokens": true, "include_stop_str_in_output": false, "nvext": {"annotations": null}}))),
        ("stream with usage", Chat, chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}))),
        ("vllm extensions", Chat, chat_body(json!({"ignore_eos": true, "min_tokens": 4, "max_tokens": 8, "repetition_penalty": 1.1}))),
        ("text prompt", Cmpl, cmpl_body(json!({}))),
        ("token prompt", Cmpl, cmpl_body(json!({"prompt": [1, 2, 3], "best_of": 1, "echo": false}))),
        ("nested token prompt", Cmpl, cmpl_body(json!({"prompt": [[5, 6]]}))),
        ("one-string list", Cmpl, cmpl_body(json!({"prompt": ["hello"]}))),
    ];
    for (case, ep, body) in table {
        let p = run(ep, body).unwrap_or_else(|e| panic!("{case}: {e:?}"));
        assert!(!p.request.token_ids.is_empty(), "{case}");
        let room = CONTEXT - p.request.token_ids.len() as u32;
        assert!(
            p.request.stop.max_tokens.is_some_and(|m| m <= room),
            "{case}"
        );
    }
}

#[test]
fn fields_reach_the_engine_request() {
    let p = run(
        Ep::Chat,
        chat_body(
            json!({"temperature": 0.7, "top_k": 40, "seed": -3, "n": 3, "stop": "\n",
            "max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .unwrap();
    let s = &p.request.sampling;
    assert_eq!((s.temperature, s.top_k, s.n), (Some(0.7), Some(40), 3));
    assert_eq!(s.seed, Some(-3i64 as u64));
    assert_eq!(p.request.stop.max_tokens, Some(12));
    assert_eq!(
        p.request.stop.stop_token_ids,
        vec![2],
        "the model's end-of-sequence id"
    );
    assert_eq!(p.stops, vec!["\n".to_string()]);
    assert!(p.stream && p.include_usage);
    // Default max_tokens: what is left of the context.
    let p = run(Ep::Cmpl, cmpl_body(json!({"prompt": [1, 2, 3]}))).unwrap();
    assert_eq!(p.request.stop.max_tokens, Some(CONTEXT - 3));
    assert_eq!(p.request.token_ids, vec![1, 2, 3]);
    // nvext: greedy, ignore_eos, a worker; top-level fields win over nvext's.
    let p = run(
        Ep::Chat,
        chat_body(
            json!({"temperature": 1.0, "top_k": 5, "nvext": {"greed_sampling": true,
            "ignore_eos": true, "top_k": 9, "backend_instance_id": 77}}),
        ),
    )
    .unwrap();
    assert_eq!(p.request.sampling.temperature, Some(0.0));
    assert_eq!(p.request.sampling.top_k, Some(5));
    assert!(p.request.stop.ignore_eos && p.request.stop.stop_token_ids.is_empty());
    assert_eq!(p.worker, Some(77));
}

#[test]
fn logprobs_grammars_and_tools_reach_the_engine_request() {
    use tandem_preprocessor::tools::ToolMode;
    use tandem_protocols::llm::GuidedDecoding;
    let p = run(
        Ep::Chat,
        chat_body(json!({"logprobs": true, "top_logprobs": 3})),
    )
    .unwrap();
    assert_eq!(p.request.output_options.logprobs, Some(3));
    let p = run(Ep::Chat, chat_body(json!({"logprobs": false}))).unwrap();
    assert_eq!(p.request.output_options.logprobs, None);
    let p = run(Ep::Cmpl, cmpl_body(json!({"logprobs": 0}))).unwrap();
    assert_eq!(p.request.output_options.logprobs, Some(0));
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let p = run(
        Ep::Chat,
        chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}})),
    )
    .unwrap();
    assert_eq!(
        p.request.sampling.guided_decoding,
        Some(GuidedDecoding::JsonSchema(schema.clone()))
    );
    let p = run(
        Ep::Cmpl,
        cmpl_body(json!({"guided_json": schema.to_string()})),
    )
    .unwrap();
    assert_eq!(
        p.request.sampling.guided_decoding,
        Some(GuidedDecoding::JsonSchema(schema))
    );
    let p = run(
        Ep::Chat,
        chat_body(json!({"response_format": {"type": "json_object"}})),
    )
    .unwrap();
    assert_eq!(
        p.request.sampling.guided_decoding,
        Some(GuidedDecoding::JsonObject)
    );
    let p = run(
        Ep::Chat,
        chat_body(json!({"response_format": {"type": "text"}})),
    )
    .unwrap();
    assert_eq!(p.request.sampling.guided_decoding, None);
    let p = run(
        Ep::Chat,
        chat_body(json!({"nvext": {"guided_choice": ["yes", "no"]}})),
    )
    .unwrap();
    assert!(matches!(
        p.request.sampling.guided_decoding,
        Some(GuidedDecoding::Choice(_))
    ));
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
    let p = run(
        Ep::Chat,
        chat_body(
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}}),
        ),
    )
    .unwrap();
    assert_eq!(p.tools, Some(ToolMode::Named("f".into())));
    assert!(matches!(
        p.request.sampling.guided_decoding,
        Some(GuidedDecoding::JsonSchema(_))
    ));
    let none = run(
        Ep::Chat,
        chat_body(json!({"tools": tools, "tool_choice": "none"})),
    )
    .unwrap();
    assert_eq!(none.tools, None);
}
