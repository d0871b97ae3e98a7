#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The request path as a client sees it, with real frontend and mocker worker processes:
//! fields tandem does not implement are refused by name, bad token ids are the client's 400,
//! errors keep their class across the request plane (an engine failure mid-stream is an SSE
//! `error` event and an `error_type` label), a choice ended by a stop string stops generating
//! on the worker, 405s carry OpenAI's envelope, and bad configuration stops a process at
//! start-up naming the flag.

use anyhow::Result;
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;
use tandem_protocols::llm::{EngineOutput, PreprocessedRequest, StopConditions};
use tandem_runtime::{DistributedRuntime, EndpointId, ErrorCode, RouterMode, RuntimeError};
use tandem_tests::{BUNDLED_MODEL_NAME, Served, metric_value, scrape, workspace_bin};

const MODEL: &str = BUNDLED_MODEL_NAME;

async fn start(extra: &[&str]) -> Result<Served> {
    let mut args = vec!["--engine", "mocker", "--block-size", "16"];
    args.extend_from_slice(extra);
    Served::start(&args, &[], Duration::from_secs(30)).await
}

async fn post(url: &str, body: Value) -> Result<reqwest::Response> {
    Ok(reqwest::Client::new().post(url).json(&body).send().await?)
}

async fn worker_metric(s: &Served, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(metric_value(&scrape(&s.system_url("/metrics")).await?, name, labels).unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_fields_and_bad_token_ids_are_refused_by_name() -> Result<()> {
    let s = start(&["--speedup-ratio", "0"]).await?;
    let chat = s.url("/v1/chat/completions");
    let cmpl = s.url("/v1/completions");
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let c = |extra: Value| {
        let mut b = json!({"model": MODEL, "messages": msgs, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let p = |extra: Value| {
        let mut b = json!({"model": MODEL, "prompt": "Once", "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // (url, body, the param the error must name, its code)
    let cases = [
        (
            &chat,
            c(json!({"tools": [{"type": "function", "function": {"name": "f b"}}]})),
            "tools[0].function.name",
            None,
        ),
        (
            &chat,
            c(json!({"tool_choice": "auto"})),
            "tool_choice",
            None,
        ),
        (
            &chat,
            c(
                json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}),
            ),
            "tool_choice",
            Some("unsupported_parameter"),
        ),
        (
            &chat,
            c(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
            ),
            "response_format.json_schema.schema",
            None,
        ),
        (
            &chat,
            c(json!({"top_logprobs": 21, "logprobs": true})),
            "top_logprobs",
            None,
        ),
        (
            &chat,
            c(json!({"logit_bias": {"50256": -100}})),
            "logit_bias",
            Some("unsupported_parameter"),
        ),
        (
            &chat,
            c(json!({"logit_bias": {"x": 1}})),
            "logit_bias",
            None,
        ),
        (
            &chat,
            c(json!({"functions": [{"name": "f"}]})),
            "functions",
            Some("unsupported_parameter"),
        ),
        (
            &chat,
            c(json!({"nvext": {"annotations": ["request_id"]}})),
            "nvext.annotations",
            Some("unsupported_parameter"),
        ),
        (
            &chat,
            c(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            "messages[0].role",
            None,
        ),
        (
            &chat,
            c(json!({"messages": [{"role": "user"}]})),
            "messages[0].content",
            None,
        ),
        (
            &chat,
            c(json!({"stream_options": {"include_usage": true}})),
            "stream_options",
            None,
        ),
        (&chat, c(json!({"user": 42})), "user", None),
        (
            &cmpl,
            p(json!({"best_of": 2})),
            "best_of",
            Some("unsupported_parameter"),
        ),
        (&cmpl, p(json!({"logprobs": 6})), "logprobs", None),
        (
            &cmpl,
            p(json!({"echo": true})),
            "echo",
            Some("unsupported_parameter"),
        ),
        (
            &cmpl,
            p(json!({"suffix": "!"})),
            "suffix",
            Some("unsupported_parameter"),
        ),
        (&cmpl, p(json!({"prompt": [1, 49152]})), "prompt", None),
        (&cmpl, p(json!({"prompt": [1, -7]})), "prompt", None),
    ];
    for (url, body, param, code) in cases {
        let r = post(url, body.clone()).await?;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await?;
        let e = &v["error"];
        assert_eq!(e["param"], param, "{body}: {v}");
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        if let Some(code) = code {
            assert_eq!(e["code"], code, "{v}");
        }
    }
    let text = scrape(&s.system_url("/metrics")).await?;
    let reached = metric_value(
        &text,
        "dynamo_component_requests_total",
        &[("dynamo_endpoint", "generate")],
    );
    assert_eq!(
        reached.unwrap_or(0.0),
        0.0,
        "no refused request reached the worker"
    );
    // A field no API defines is ignored; off-values of unimplemented ones are accepted.
    let ok = c(
        json!({"made_up_field": true, "tool_choice": "none", "logprobs": false,
        "response_format": {"type": "text"}, "ignore_eos": true, "min_tokens": 2}),
    );
    let r = post(&chat, ok).await?;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await?;
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // The mocker follows no grammar: refused by the worker as the client's error.
    let r = post(
        &chat,
        c(json!({"response_format": {"type": "json_object"}})),
    )
    .await?;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await?;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("mocker engine cannot follow a grammar"),
        "{v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_errors_keep_their_class_across_the_request_plane() -> Result<()> {
    let s = start(&["--speedup-ratio", "0"]).await?;
    let drt = DistributedRuntime::connect(s.stack.runtime_config()).await?;
    let client = drt
        .endpoint(EndpointId::new("dynamo", "backend", "generate")?)
        .client();
    client.wait_for_instances(Duration::from_secs(10)).await?;
    let request = |ids: Vec<u32>| PreprocessedRequest {
        model: MODEL.into(),
        token_ids: ids,
        sampling: Default::default(),
        stop: StopConditions {
            max_tokens: Some(2),
            ..Default::default()
        },
        ..Default::default()
    };
    let cases = [
        (
            request(vec![1, 2, 49152]),
            ErrorCode::InvalidRequest,
            "outside the vocabulary",
        ),
        (request(vec![]), ErrorCode::InvalidRequest, "empty prompt"),
        (
            request(vec![7; 8192]),
            ErrorCode::ContextLength,
            "does not fit",
        ),
    ];
    for (req, code, text) in cases {
        let mut stream = client
            .call::<_, EngineOutput>(RouterMode::RoundRobin, &req, Default::default())
            .await?;
        match stream.next().await {
            Some(Err(RuntimeError::Remote(e))) => {
                assert_eq!(e.code, code, "{e}");
                assert!(e.message.contains(text), "{e}");
            }
            other => panic!("expected a remote {code} error, got {other:?}"),
        }
    }
    // A body that is not a request at all.
    let mut raw = client
        .generate(
            RouterMode::RoundRobin,
            "not json".into(),
            Default::default(),
        )
        .await?;
    match raw.next().await {
        Some(Err(RuntimeError::Remote(e))) => assert_eq!(e.code, ErrorCode::InvalidRequest),
        other => panic!("expected invalid_request, got {other:?}"),
    }
    drt.shutdown().await;
    Ok(())
}

/// The SSE events of a streamed response: (event name, data).
fn sse_events(body: &str) -> Vec<(String, String)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = "message".to_string();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_failure_mid_stream_is_an_error_event_and_counted() -> Result<()> {
    let s = start(&["--speedup-ratio", "10", "--fail-after-tokens", "3"]).await?;
    let chat = s.url("/v1/chat/completions");
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 20, "stream": true});
    let r = post(&chat, body.clone()).await?;
    assert_eq!(r.status(), 200, "the stream had started");
    let events = sse_events(&r.text().await?);
    let (last_name, last_data) = events.last().unwrap().clone();
    assert_eq!(last_name, "error", "{events:?}");
    let err: Value = serde_json::from_str(&last_data)?;
    assert_eq!(err["error"]["type"], "internal_error", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{err}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert!(!chunks.is_empty(), "tokens came before the failure");
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null()),
        "no normal finish: {chunks:?}"
    );
    assert!(!events.iter().any(|(_, d)| d == "[DONE]"));

    // Unary: a 5xx with the envelope.
    let mut unary = body.clone();
    unary["stream"] = json!(false);
    let r = post(&chat, unary).await?;
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["type"], "internal_error");

    // The official SDK raises on the error event.
    let (ok, text) =
        tandem_tests::run_sdk_script("openai_stream_error.py", &s.url("/v1"), MODEL).await?;
    assert!(ok, "{text}");
    assert!(text.contains("sdk raised"), "{text}");

    let m = scrape(&s.url("/metrics")).await?;
    for request_type in ["stream", "unary"] {
        let n = metric_value(
            &m,
            "dynamo_frontend_requests_total",
            &[
                ("endpoint", "chat_completions"),
                ("request_type", request_type),
                ("status", "error"),
                ("error_type", "internal"),
            ],
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{request_type}: {m}");
    }
    assert_eq!(
        worker_metric(&s, "dynamo_component_kvstats_active_blocks", &[]).await?,
        0.0,
        "the failed step freed its blocks"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_choice_ended_by_a_stop_string_stops_generating_on_the_worker() -> Result<()> {
    const MAX: u64 = 300;
    // ~10 ms a step: the stop reaches the worker long before the other choice ends.
    let s = start(&["--speedup-ratio", "0.6"]).await?;
    let cmpl = s.url("/v1/completions");
    let generated = || worker_metric(&s, "vllm:generation_tokens_total", &[("model_name", MODEL)]);
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "n": 2, "seed": 7,
        "max_tokens": MAX, "ignore_eos": true});
    let before = generated().await?;
    let v: Value = post(&cmpl, body.clone()).await?.json().await?;
    let after_full = generated().await?;
    assert_eq!(
        after_full - before,
        2.0 * MAX as f64,
        "both choices ran to the end"
    );
    let text = |v: &Value, i: usize| v["choices"][i]["text"].as_str().unwrap().to_string();
    let (t0, t1) = (text(&v, 0), text(&v, 1));
    // A stop string early in choice 0 that choice 1 never produces.
    let chars: Vec<char> = t0.chars().collect();
    let stop = (8..chars.len() - 6)
        .map(|at| chars[at..at + 6].iter().collect::<String>())
        .find(|s| !t1.contains(s.as_str()) && t0.find(s.as_str()).is_some_and(|i| i >= 8))
        .expect("a stop string");
    let mut with_stop = body.clone();
    with_stop["stop"] = json!(stop);
    let v: Value = post(&cmpl, with_stop).await?.json().await?;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(v["choices"][1]["finish_reason"], "length", "{v}");
    assert_eq!(text(&v, 1), t1, "choice 1 is unchanged");
    let prefix = text(&v, 0);
    assert!(t0.starts_with(&prefix) && !prefix.contains(stop.as_str()));
    let delta = generated().await? - after_full;
    // Choice 1's MAX tokens, choice 0's tokens up to the stop string, and a few steps while
    // the stop travelled; without stopping it, choice 0 would have made MAX as well.
    assert!(
        delta < (MAX + MAX / 2) as f64,
        "worker generated {delta} tokens; choice 0 kept going after its stop string"
    );
    assert!(delta > MAX as f64, "{delta}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_get_405_with_the_envelope() -> Result<()> {
    let s = start(&["--speedup-ratio", "0"]).await?;
    let http = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::GET, "/v1/chat/completions"),
        (reqwest::Method::PUT, "/v1/completions"),
        (reqwest::Method::DELETE, "/v1/models"),
        (reqwest::Method::POST, "/health"),
    ] {
        let r = http.request(method.clone(), s.url(path)).send().await?;
        assert_eq!(r.status(), 405, "{method} {path}");
        assert!(r.headers().contains_key("allow"), "{method} {path}");
        let v: Value = r.json().await?;
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some());
    }
    let r = http.get(s.url("/v1/nothing")).send().await?;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["type"], "not_found_error");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_stops_the_process_naming_the_flag() -> Result<()> {
    let model = tandem_tests::bundled_model()?;
    let model = model.to_str().unwrap();
    // (program, args, environment, what the error must name)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 12] = [
        (
            "frontend",
            vec![],
            vec![("DYN_ROUTER_MODE", "kv-ish")],
            "--router-mode",
        ),
        (
            "frontend",
            vec![],
            vec![("DYN_STREAM_STALL_TIMEOUT_SECS", "soon")],
            "--stream-stall-timeout-secs",
        ),
        (
            "frontend",
            vec!["--kv-cache-block-size", "0"],
            vec![],
            "--kv-cache-block-size",
        ),
        (
            "worker",
            vec!["--model-path", model, "--block-size", "0"],
            vec![],
            "--block-size",
        ),
        (
            "worker",
            vec!["--model-path", model],
            vec![("DYN_SYSTEM_PORT", "99999")],
            "--system-port",
        ),
        (
            "worker",
            vec!["--model-path", model],
            vec![("DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS", "generate")],
            "--system-use-endpoint-health-status",
        ),
        (
            "worker",
            vec![
                "--model-path",
                model,
                "--is-prefill-worker",
                "--is-decode-worker",
            ],
            vec![],
            "--is-decode-worker",
        ),
        (
            "worker",
            vec!["--model-path", model, "--kv-transfer-timeout", "0"],
            vec![],
            "--kv-transfer-timeout",
        ),
        (
            "worker",
            vec!["--model-path", model, "--disaggregation-mode", "both"],
            vec![],
            "--disaggregation-mode",
        ),
        (
            "frontend",
            vec![],
            vec![("DYN_MAX_LOCAL_PREFILL_LENGTH", "-1")],
            "--max-local-prefill-length",
        ),
        (
            "worker",
            vec!["--model-path", model],
            vec![("DYN_SYSTEM_HEALTH_PATH", "health")],
            "--system-health-path",
        ),
        (
            "worker",
            vec!["--model-path", model],
            vec![("DYN_SYSTEM_STARTING_HEALTH_STATUS", "maybe")],
            "--system-starting-health-status",
        ),
    ];
    for (program, args, env, flag) in cases {
        let out = tokio::process::Command::new(workspace_bin(program)?)
            .args(&args)
            .envs(env.iter().copied())
            // Nothing listens here: a process that got past its flags would fail differently.
            .env("NATS_SERVER", "nats://127.0.0.1:1")
            .env("ETCD_ENDPOINTS", "http://127.0.0.1:1")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), out).await??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{program} {args:?} {env:?}: {stderr}"
        );
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
    Ok(())
}
