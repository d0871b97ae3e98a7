#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! frontend + mocker worker as real processes over real nats-server and etcd, driven over HTTP.

use anyhow::Result;
use serde_json::{Value, json};
use std::time::Duration;
use tandem_tests::{BUNDLED_MODEL_NAME, Served, metric_value, scrape, wait_for};

const MODEL: &str = BUNDLED_MODEL_NAME;

/// The stack with a mocker worker (16-token blocks, a 2 s lease so a killed worker leaves
/// discovery quickly) at the given speed-up ratio.
async fn start(speedup: &str) -> Result<Served> {
    Served::start(
        &[
            "--engine",
            "mocker",
            "--speedup-ratio",
            speedup,
            "--block-size",
            "16",
        ],
        &[("DYN_LEASE_TTL_SECS", "2")],
        Duration::from_secs(30),
    )
    .await
}

async fn post(url: &str, body: Value) -> Result<reqwest::Response> {
    Ok(reqwest::Client::new().post(url).json(&body).send().await?)
}

async fn generate_requests(s: &Served) -> Result<f64> {
    let text = scrape(&format!("http://127.0.0.1:{}/metrics", s.system)).await?;
    Ok(metric_value(
        &text,
        "dynamo_component_requests_total",
        &[("dynamo_endpoint", "generate")],
    )
    .unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_streamed_and_unary() -> Result<()> {
    let s = start("0").await?;

    // Unary chat, with x-request-id echoed.
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("x-request-id", "test-req-42")
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7, "seed": 3}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "test-req-42");
    let v: Value = r.json().await?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 5);
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        prompt_tokens + 7
    );
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!full.is_empty());

    // Streamed, byte-level SSE framing: every event is `data: ...\n\n`, usage last, then [DONE].
    let r = post(
        &s.url("/v1/chat/completions"),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7, "seed": 3,
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let body = r.text().await?;
    assert!(body.ends_with("data: [DONE]\n\n"), "{body:?}");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(
        events
            .iter()
            .all(|e| e.starts_with("data: ") && !e[6..].contains('\n')),
        "{body:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e[6..]).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, full, "same seed, same text, streamed or not");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 7);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "length")
    );

    // A stop string cuts the same text where it first appears, and is not sent.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let v: Value = post(
        &s.url("/v1/chat/completions"),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7, "seed": 3, "stop": [stop]}),
    )
    .await?
    .json()
    .await?;
    let cut = &full[..full.find(&stop).unwrap()];
    assert_eq!(
        v["choices"][0]["message"]["content"], cut,
        "stop {stop:?} in {full:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Completions with n = 2 and max_completion_tokens.
    let v: Value = post(
        &s.url("/v1/completions"),
        json!({"model": MODEL, "prompt": "Once upon", "max_completion_tokens": 4, "n": 2}),
    )
    .await?
    .json()
    .await?;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let r = post(
        &s.url("/v1/completions"),
        json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 3, "stream": true}),
    )
    .await?;
    let body = r.text().await?;
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert!(body.contains("\"object\":\"text_completion\""));
    assert_eq!(
        generate_requests(&s).await?,
        5.0,
        "one worker request per HTTP request"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_get_openai_bodies_and_never_reach_a_worker() -> Result<()> {
    let s = start("0").await?;
    let http = reqwest::Client::new();
    let chat = s.url("/v1/chat/completions");
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let long = "word ".repeat(9000);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, Option<&str>)> = vec![
        (
            "malformed json",
            http.post(&chat)
                .header("content-type", "application/json")
                .body("{\"model\":"),
            400,
            None,
        ),
        (
            "missing messages",
            http.post(&chat).json(&json!({"model": MODEL})),
            400,
            None,
        ),
        (
            "empty messages",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": []})),
            400,
            None,
        ),
        (
            "wrong type",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": msgs, "max_tokens": "ten"})),
            400,
            None,
        ),
        (
            "temperature",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": msgs, "temperature": 5})),
            400,
            None,
        ),
        (
            "top_p",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": msgs, "top_p": 0})),
            400,
            None,
        ),
        (
            "n",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": msgs, "n": 0})),
            400,
            None,
        ),
        (
            "penalty",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": msgs, "presence_penalty": -3})),
            400,
            None,
        ),
        (
            "max_tokens",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": msgs, "max_tokens": 0})),
            400,
            None,
        ),
        (
            "context",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": long}]})),
            400,
            Some("context_length_exceeded"),
        ),
        (
            "max_tokens over context",
            http.post(&chat)
                .json(&json!({"model": MODEL, "messages": msgs, "max_tokens": 9000})),
            400,
            Some("context_length_exceeded"),
        ),
        (
            "unknown model",
            http.post(&chat)
                .json(&json!({"model": "nope", "messages": msgs})),
            404,
            Some("model_not_found"),
        ),
        (
            "no content type",
            http.post(&chat)
                .body(json!({"model": MODEL, "messages": msgs}).to_string()),
            415,
            None,
        ),
        (
            "too large",
            http.post(&chat)
                .header("content-type", "application/json")
                .body(vec![b' '; 9 * 1024 * 1024]),
            413,
            None,
        ),
    ];
    for (name, req, status, code) in cases {
        let r = req.send().await?;
        assert_eq!(r.status().as_u16(), status, "{name}");
        let v: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {v}"
        );
        assert!(
            err["type"].is_string() && err.get("param").is_some() && err.get("code").is_some(),
            "{name}: {v}"
        );
        if let Some(code) = code {
            assert_eq!(err["code"], code, "{name}");
        }
    }
    assert_eq!(
        generate_requests(&s).await?,
        0.0,
        "no error reached the worker"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_dead_worker_means_503() -> Result<()> {
    let mut s = start("0").await?;
    let n = 5;
    for i in 0..n {
        let r = post(
            &s.url("/v1/chat/completions"),
            json!({"model": MODEL, "messages": [{"role": "user", "content": format!("Hello {i}")}], "max_tokens": 3, "stream": i % 2 == 0}),
        )
        .await?;
        assert_eq!(r.status(), 200);
        r.text().await?;
    }
    let text = scrape(&s.url("/metrics")).await?;
    let m = [("model", MODEL)];
    let count = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    assert_eq!(
        count(
            "dynamo_frontend_requests_total",
            &[
                ("model", MODEL),
                ("endpoint", "chat_completions"),
                ("request_type", "stream"),
                ("status", "success")
            ]
        ),
        Some(3.0)
    );
    assert_eq!(
        count(
            "dynamo_frontend_requests_total",
            &[
                ("model", MODEL),
                ("endpoint", "chat_completions"),
                ("request_type", "unary"),
                ("status", "success")
            ]
        ),
        Some(2.0)
    );
    for h in [
        "request_duration_seconds",
        "time_to_first_token_seconds",
        "input_sequence_tokens",
    ] {
        assert_eq!(
            count(&format!("dynamo_frontend_{h}_count"), &m),
            Some(n as f64),
            "{h}"
        );
    }
    assert_eq!(
        count("dynamo_frontend_output_tokens_total", &m),
        Some(3.0 * n as f64)
    );
    assert_eq!(
        count("dynamo_frontend_inter_token_latency_seconds_count", &m),
        Some(2.0 * n as f64)
    );
    assert_eq!(count("dynamo_frontend_inflight_requests", &m), Some(0.0));
    assert_eq!(count("dynamo_frontend_queued_requests", &m), Some(0.0));
    assert_eq!(count("dynamo_frontend_model_workers", &m), Some(1.0));
    assert_eq!(
        count("dynamo_frontend_model_context_length", &m),
        Some(8192.0)
    );
    assert_eq!(
        count("dynamo_frontend_model_kv_cache_block_size", &m),
        Some(16.0)
    );
    assert_eq!(
        count("dynamo_frontend_model_total_kv_blocks", &m),
        Some(16384.0)
    );
    assert!(text.contains("dynamo_frontend_time_to_first_token_seconds_bucket{model=\"SmolLM2-135M-Instruct\",le=\"0.0022\"}"));

    s.worker.kill();
    let http = reqwest::Client::new();
    let models = s.url("/v1/models");
    wait_for(
        Duration::from_secs(15),
        "the model to leave /v1/models",
        || {
            let (c, u) = (http.clone(), models.clone());
            async move {
                let v: Value = c.get(&u).send().await.ok()?.json().await.ok()?;
                v["data"]
                    .as_array()
                    .is_some_and(|d| d.is_empty())
                    .then_some(())
            }
        },
    )
    .await?;
    let r = post(
        &s.url("/v1/chat/completions"),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await?;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["type"], "service_unavailable");
    let _ = &s.stack;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_frees_the_workers_blocks() -> Result<()> {
    use futures::StreamExt;
    // Real mocker timing (about 6 ms a token): the stream is long enough to walk away from.
    let s = start("1").await?;
    let r = post(
        &s.url("/v1/chat/completions"),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 4000, "stream": true}),
    )
    .await?;
    let mut body = r.bytes_stream();
    body.next().await.transpose()?;
    let worker_metrics = format!("http://127.0.0.1:{}/metrics", s.system);
    let text = scrape(&worker_metrics).await?;
    assert_eq!(
        metric_value(
            &text,
            "dynamo_component_inflight_requests",
            &[("dynamo_endpoint", "generate")]
        ),
        Some(1.0)
    );
    assert!(
        metric_value(&text, "dynamo_component_kvstats_active_blocks", &[]).unwrap_or(0.0) > 0.0
    );
    drop(body);
    wait_for(
        Duration::from_secs(10),
        "the worker to free the request",
        || {
            let url = worker_metrics.clone();
            async move {
                let text = scrape(&url).await.ok()?;
                let inflight = metric_value(
                    &text,
                    "dynamo_component_inflight_requests",
                    &[("dynamo_endpoint", "generate")],
                )?;
                let active = metric_value(&text, "dynamo_component_kvstats_active_blocks", &[])?;
                (inflight == 0.0 && active == 0.0).then_some(())
            }
        },
    )
    .await?;
    let text = scrape(&s.url("/metrics")).await?;
    assert_eq!(
        metric_value(&text, "dynamo_frontend_disconnected_clients", &[]),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_sdk_works_against_the_frontend() -> Result<()> {
    let s = start("0").await?;
    let (ok, text) = tandem_tests::run_sdk_script("openai_sdk.py", &s.url("/v1"), MODEL).await?;
    assert!(ok, "{text}");
    assert!(text.contains("openai sdk ok"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_not_ready_until_a_model_is_routable_and_worker_paths_are_configurable()
-> Result<()> {
    use tandem_tests::{Stack, mocker_args};
    let stack = Stack::start().await?;
    let (_frontend, http) = stack.spawn_frontend("frontend", &[], &[])?;
    let health = format!("http://127.0.0.1:{http}/health");
    // Up, but nothing to route to: not ready (Dynamo's users see requests fail otherwise).
    let r = wait_for(Duration::from_secs(15), "the frontend to answer", || {
        let url = health.clone();
        async move { reqwest::get(url).await.ok() }
    })
    .await?;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await?;
    assert_eq!(v["status"], "not_ready");
    assert_eq!(
        reqwest::get(format!("http://127.0.0.1:{http}/live"))
            .await?
            .status(),
        200
    );

    let args = mocker_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_worker, system) = stack.spawn_worker(
        "worker",
        &args,
        &[
            ("DYN_SYSTEM_HEALTH_PATH", "/ready"),
            ("DYN_SYSTEM_LIVE_PATH", "/alive"),
        ],
    )?;
    wait_for(
        Duration::from_secs(30),
        "the frontend to turn ready",
        || {
            let url = health.clone();
            async move {
                let r = reqwest::get(url).await.ok()?;
                (r.status() == 200).then_some(())
            }
        },
    )
    .await?;
    let v: Value = reqwest::get(&health).await?.json().await?;
    assert_eq!(v["status"], "healthy");
    let sys = |path: &str| format!("http://127.0.0.1:{system}{path}");
    let ready: Value = wait_for(Duration::from_secs(15), "the worker's /ready", || {
        let url = sys("/ready");
        async move {
            let r = reqwest::get(url).await.ok()?;
            (r.status() == 200).then_some(r)
        }
    })
    .await?
    .json()
    .await?;
    assert_eq!(ready["status"], "ready");
    assert_eq!(reqwest::get(sys("/alive")).await?.status(), 200);
    assert_eq!(reqwest::get(sys("/health")).await?.status(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_worker_whose_engine_fails_or_hangs_on_its_canary_turns_not_ready() -> Result<()> {
    use tandem_tests::{Stack, mocker_args};
    let stack = Stack::start().await?;
    let canary = [
        ("DYN_HEALTH_CHECK_ENABLED", "true"),
        ("DYN_CANARY_WAIT_TIME", "0.2"),
        ("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", "2"),
    ];
    let args = mocker_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_good, good) = stack.spawn_worker("good", &args, &canary)?;
    // Every step of this one fails, as a broken engine's would.
    let broken_args = mocker_args(&["--fail-after-tokens", "0"]);
    let broken_args: Vec<&str> = broken_args.iter().map(String::as_str).collect();
    let (_bad, bad) = stack.spawn_worker("bad", &broken_args, &canary)?;
    // And this one is wedged: a step takes minutes, so the canary times out.
    let mut wedged_args = mocker_args(&[]);
    wedged_args[3] = "0.0001".into();
    let wedged_args: Vec<&str> = wedged_args.iter().map(String::as_str).collect();
    let (_wedged, wedged) = stack.spawn_worker("wedged", &wedged_args, &canary)?;
    let get = |port: u16, path: &'static str| async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.json::<Value>().await.ok()?))
    };
    let (_, body) = wait_for(
        Duration::from_secs(30),
        "the broken worker to turn not ready",
        || async move {
            get(bad, "/health")
                .await
                .filter(|(s, b)| *s == 503 && b["endpoints"]["generate"] == "notready")
        },
    )
    .await?;
    assert_eq!(body["status"], "notready");
    wait_for(
        Duration::from_secs(30),
        "the wedged worker to turn not ready",
        || async move { get(wedged, "/health").await.filter(|(s, _)| *s == 503) },
    )
    .await?;
    // The healthy one ran canaries (their tokens show in its engine counters) and is ready.
    wait_for(
        Duration::from_secs(30),
        "canaries on the healthy worker",
        || async move {
            let text = scrape(&format!("http://127.0.0.1:{good}/metrics"))
                .await
                .ok()?;
            (metric_value(&text, "tandem_engine_generation_tokens_total", &[])? >= 2.0)
                .then_some(())
        },
    )
    .await?;
    let (status, body) = get(good, "/health").await.unwrap();
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    Ok(())
}
