#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Distributed tracing end to end: the real `frontend` and `worker` (mocker engine) export OTLP
//! to a gRPC collector running in the test, over real nats-server and etcd.

use anyhow::Result;
use serde_json::{Value, json};
use std::time::Duration;
use tandem_tests::otlp::{Collector, Span};
use tandem_tests::{BUNDLED_MODEL_NAME, Served, free_port, log_lines, wait_for};

const MODEL: &str = BUNDLED_MODEL_NAME;

/// Frontend and mocker worker with `env` on both, the frontend exporting as `dynamo-frontend`
/// and the worker under its default service name.
async fn start(env: &[(&str, &str)]) -> Result<Served> {
    let mut frontend_env = env.to_vec();
    frontend_env.push(("OTEL_SERVICE_NAME", "dynamo-frontend"));
    Served::start_with(
        &["--engine", "mocker", "--speedup-ratio", "10"],
        env,
        &frontend_env,
        Duration::from_secs(30),
    )
    .await
}

async fn chat(s: &Served, headers: &[(&str, &str)], body: Value) -> Result<reqwest::Response> {
    let mut req = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Ok(req.send().await?)
}

fn body(max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about tracing."}],
        "max_tokens": max_tokens,
    })
}

/// Waits until the collector holds a span named `name` with `x_request_id` = `xid` matching
/// `pred`.
async fn wait_span(
    c: &Collector,
    name: &str,
    xid: &str,
    pred: impl Fn(&Span) -> bool,
) -> Result<Span> {
    wait_for(
        Duration::from_secs(20),
        &format!("span {name} for {xid}"),
        || {
            let found = c
                .spans()
                .into_iter()
                .find(|s| s.name == name && s.attr("x_request_id") == Some(xid) && pred(s));
            async move { found }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_is_one_trace_across_frontend_and_worker() -> Result<()> {
    let collector = Collector::start().await?;
    let endpoint = collector.endpoint();
    let s = start(&[
        ("OTEL_EXPORT_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("DYN_LOGGING_JSONL", "true"),
        ("DYN_LOG", "info,tandem_runtime=debug,tandem_frontend=debug"),
    ])
    .await?;

    // 1. One request → one trace: http-request → client_request → handle_payload.
    let xid = "test-trace-001";
    let r = chat(&s, &[("x-request-id", xid)], body(5)).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], xid);
    let v: Value = r.json().await?;
    let out_tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    let in_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();

    let http = wait_span(&collector, "http-request", xid, |_| true).await?;
    let client = wait_span(&collector, "client_request", xid, |_| true).await?;
    let payload = wait_span(&collector, "handle_payload", xid, |_| true).await?;
    let traces: std::collections::HashSet<String> = collector
        .spans()
        .iter()
        .filter(|s| s.attr("x_request_id") == Some(xid))
        .map(|s| s.trace_id.clone())
        .collect();
    assert_eq!(traces.len(), 1, "exactly one trace for {xid}: {traces:?}");

    assert_eq!(http.service, "dynamo-frontend");
    assert_eq!(http.parent_span_id, "", "http-request is the root");
    assert_eq!(http.attr("method"), Some("POST"));
    assert_eq!(http.attr("uri"), Some("/v1/chat/completions"));
    assert_eq!(http.attr("version"), Some("HTTP/1.1"));
    assert_eq!(http.attr("trace_id"), Some(http.trace_id.as_str()));
    assert_eq!(http.attr("model"), Some(MODEL));
    assert_eq!(
        http.attr("input_tokens"),
        Some(in_tokens.to_string().as_str())
    );
    assert_eq!(
        http.attr("output_tokens"),
        Some(out_tokens.to_string().as_str())
    );
    assert!(http.attr("ttft_ms").unwrap().parse::<f64>()? > 0.0);
    assert_eq!(http.attr("request.outcome"), Some("success"));

    assert_eq!(client.service, "dynamo-frontend");
    assert_eq!(client.trace_id, http.trace_id);
    assert_eq!(client.parent_span_id, http.span_id);
    let instance = client
        .attr("instance_id")
        .expect("client_request instance_id");

    assert_eq!(
        payload.service, "worker",
        "the worker's default service name"
    );
    assert_eq!(payload.trace_id, http.trace_id);
    assert_eq!(payload.parent_span_id, client.span_id);
    assert_eq!(payload.attr("parent_id"), Some(client.span_id.as_str()));
    assert_eq!(payload.attr("namespace"), Some("dynamo"));
    assert_eq!(payload.attr("component"), Some("backend"));
    assert_eq!(payload.attr("endpoint"), Some("generate"));
    assert_eq!(payload.attr("instance_id"), Some(instance));

    // 3. Both processes' log lines for the request carry the exported trace id.
    let front = log_lines(&s.frontend.output(), xid);
    let completed = front
        .iter()
        .find(|l| l["message"] == "request completed")
        .expect("frontend logs the request's completion");
    assert_eq!(completed["trace_id"], http.trace_id.as_str());
    assert_eq!(completed["span_name"], "http-request");
    assert_eq!(completed["span_id"], http.span_id.as_str());
    let worker_line = wait_for(Duration::from_secs(10), "worker log line", || {
        let lines = log_lines(&s.worker.output(), xid);
        async move {
            lines
                .into_iter()
                .find(|l| l["message"] == "request completed")
        }
    })
    .await?;
    assert_eq!(worker_line["trace_id"], http.trace_id.as_str());
    assert_eq!(worker_line["span_id"], payload.span_id.as_str());
    assert_eq!(worker_line["span_name"], "handle_payload");

    // 2. An inbound traceparent keeps the caller's trace; the caller's span is the parent.
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let xid2 = "test-trace-002";
    let tp = format!("00-{trace}-{parent}-01");
    let r = chat(
        &s,
        &[("x-request-id", xid2), ("traceparent", tp.as_str())],
        body(3),
    )
    .await?;
    assert_eq!(r.status(), 200);
    let http2 = wait_span(&collector, "http-request", xid2, |_| true).await?;
    assert_eq!(http2.trace_id, trace);
    assert_eq!(http2.parent_span_id, parent);
    assert_eq!(http2.attr("parent_id"), Some(parent));
    let payload2 = wait_span(&collector, "handle_payload", xid2, |_| true).await?;
    assert_eq!(payload2.trace_id, trace);

    // A malformed traceparent is ignored: the request succeeds in a new trace.
    let xid3 = "test-trace-003";
    let r = chat(
        &s,
        &[
            ("x-request-id", xid3),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            ),
        ],
        body(3),
    )
    .await?;
    assert_eq!(r.status(), 200);
    let http3 = wait_span(&collector, "http-request", xid3, |_| true).await?;
    assert_eq!(http3.parent_span_id, "");
    assert_ne!(http3.trace_id, trace);
    let payload3 = wait_span(&collector, "handle_payload", xid3, |_| true).await?;
    assert_eq!(payload3.trace_id, http3.trace_id);

    // Outcomes: a refused request is an error; a stream the client drops is cancelled.
    let xid4 = "test-trace-004";
    let r = chat(
        &s,
        &[("x-request-id", xid4)],
        json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await?;
    assert_eq!(r.status(), 404);
    wait_span(&collector, "http-request", xid4, |s| {
        s.attr("request.outcome") == Some("error")
    })
    .await?;

    let xid5 = "test-trace-005";
    let mut stream_body = body(4000);
    stream_body["stream"] = json!(true);
    let mut r = chat(&s, &[("x-request-id", xid5)], stream_body).await?;
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await?.is_some(), "first SSE bytes");
    drop(r);
    wait_span(&collector, "http-request", xid5, |s| {
        s.attr("request.outcome") == Some("cancelled")
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_collector_costs_one_warning_and_no_failed_request() -> Result<()> {
    // Nothing listens on this port.
    let dead = format!("http://127.0.0.1:{}", free_port()?);
    let s = start(&[
        ("OTEL_EXPORT_ENABLED", "1"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &dead),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("DYN_LOG", "info,tandem_telemetry=debug"),
    ])
    .await?;
    let failing = "OTLP trace export still failing";
    let mut sent = 0;
    // Keep sending until each process has failed to export at least three batches.
    wait_for(Duration::from_secs(60), "repeated export failures", || {
        sent += 1;
        let (f, w) = (s.frontend.output(), s.worker.output());
        let url = s.url("/v1/chat/completions");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&body(2))
                .send()
                .await
                .ok()?;
            assert_eq!(r.status(), 200, "requests succeed with the collector down");
            (f.matches(failing).count() >= 3 && w.matches(failing).count() >= 3).then_some(())
        }
    })
    .await?;
    assert!(sent >= 3);
    for (name, out) in [
        ("frontend", s.frontend.output()),
        ("worker", s.worker.output()),
    ] {
        let warnings: Vec<&str> = out.lines().filter(|l| l.contains(" WARN ")).collect();
        assert_eq!(warnings.len(), 1, "{name}: one warning, got {warnings:#?}");
        assert!(
            warnings[0].contains("OTLP trace export failed"),
            "{name}: {warnings:?}"
        );
        assert!(
            warnings[0].contains(&dead),
            "{name}: the warning names the endpoint"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_flushes_queued_spans() -> Result<()> {
    let collector = Collector::start().await?;
    let endpoint = collector.endpoint();
    // Batches would leave only after a minute: what arrives was flushed at shutdown.
    let mut s = start(&[
        ("OTEL_EXPORT_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
    ])
    .await?;
    let xid = "test-trace-flush";
    assert_eq!(
        chat(&s, &[("x-request-id", xid)], body(3)).await?.status(),
        200
    );
    assert!(collector.spans().is_empty());
    assert!(s.frontend.terminate(Duration::from_secs(20))?.success());
    assert!(s.worker.terminate(Duration::from_secs(20))?.success());
    let names: Vec<String> = collector
        .spans()
        .into_iter()
        .filter(|s| s.attr("x_request_id") == Some(xid))
        .map(|s| s.name)
        .collect();
    for want in ["http-request", "client_request", "handle_payload"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    Ok(())
}

/// The lines of `output` for `xid` with `message`.
fn lines_with(output: &str, xid: &str, message: &str) -> Vec<Value> {
    log_lines(output, xid)
        .into_iter()
        .filter(|l| l["message"] == message)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_default_log_level_both_processes_log_the_request_with_its_trace_id() -> Result<()> {
    // Dynamo's guide, as a new user follows it: JSONL and export on, DYN_LOG left at info.
    let collector = Collector::start().await?;
    let endpoint = collector.endpoint();
    let s = start(&[
        ("OTEL_EXPORT_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("DYN_LOGGING_JSONL", "true"),
        ("DYN_LOG", "info"),
    ])
    .await?;
    let xid = "test-trace-001";
    let r = chat(&s, &[("x-request-id", xid)], body(4)).await?;
    assert_eq!(r.status(), 200);
    let http = wait_span(&collector, "http-request", xid, |_| true).await?;
    let payload = wait_span(&collector, "handle_payload", xid, |_| true).await?;

    let done = wait_for(Duration::from_secs(10), "frontend completion line", || {
        let lines = lines_with(&s.frontend.output(), xid, "request completed");
        async move { lines.into_iter().next() }
    })
    .await?;
    assert_eq!(done["trace_id"], http.trace_id.as_str());
    assert_eq!(done["span_name"], "http-request");
    assert_eq!(done["status"], 200);
    assert_eq!(done["outcome"], "success");
    assert_eq!(done["model"], MODEL);
    assert_eq!(done["output_tokens"], 4);
    assert!(done["input_tokens"].as_u64().unwrap() > 0);
    assert!(done["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(done["elapsed_ms"].is_u64());
    // Frontend: accepted too (written before the completion line, which is in).
    let front = s.frontend.output();
    let accepted = lines_with(&front, xid, "request accepted");
    assert_eq!(accepted.len(), 1, "{front}");
    assert_eq!(accepted[0]["level"], "INFO");
    assert_eq!(accepted[0]["trace_id"], http.trace_id.as_str());
    assert_eq!(accepted[0]["span_id"], http.span_id.as_str());
    assert_eq!(accepted[0]["method"], "POST");
    assert_eq!(accepted[0]["uri"], "/v1/chat/completions");

    // Worker: the same, in handle_payload.
    let done = wait_for(Duration::from_secs(10), "worker completion line", || {
        let lines = lines_with(&s.worker.output(), xid, "request completed");
        async move { lines.into_iter().next() }
    })
    .await?;
    assert_eq!(done["level"], "INFO");
    assert_eq!(done["trace_id"], http.trace_id.as_str());
    assert_eq!(done["span_id"], payload.span_id.as_str());
    assert_eq!(done["span_name"], "handle_payload");
    assert_eq!(done["endpoint"], "dyn://dynamo.backend.generate");
    assert_eq!(done["model"], MODEL);
    assert_eq!(done["output_tokens"], 4);
    assert_eq!(done["finish_reasons"], r#"["length"]"#);
    assert_eq!(done["outcome"], "success");
    assert_eq!(
        lines_with(&s.worker.output(), xid, "request accepted").len(),
        1
    );

    // OpenTelemetry's GenAI attributes on both spans.
    let attr = |span: &Span, k: &str| span.attr(k).map(str::to_string);
    assert_eq!(
        attr(&http, "gen_ai.operation.name").as_deref(),
        Some("chat")
    );
    assert_eq!(attr(&http, "gen_ai.request.model").as_deref(), Some(MODEL));
    assert_eq!(
        attr(&http, "gen_ai.request.max_tokens").as_deref(),
        Some("4")
    );
    assert_eq!(
        attr(&http, "gen_ai.usage.output_tokens").as_deref(),
        Some("4")
    );
    assert_eq!(
        attr(&http, "gen_ai.response.finish_reasons").as_deref(),
        Some(r#"["length"]"#)
    );
    let input = attr(&http, "gen_ai.usage.input_tokens").unwrap();
    assert!(input.parse::<u64>()? > 0);
    let ttft: f64 = attr(&http, "gen_ai.server.time_to_first_token")
        .unwrap()
        .parse()?;
    assert!(ttft > 0.0 && ttft < 30.0, "{ttft} s");
    assert_eq!(
        attr(&payload, "gen_ai.request.model").as_deref(),
        Some(MODEL)
    );
    assert_eq!(
        attr(&payload, "gen_ai.usage.input_tokens"),
        Some(input.clone())
    );
    assert_eq!(
        attr(&payload, "gen_ai.usage.output_tokens").as_deref(),
        Some("4")
    );
    assert_eq!(
        attr(&payload, "gen_ai.response.finish_reasons").as_deref(),
        Some(r#"["length"]"#)
    );

    // The engine's phases, children of handle_payload: queued, prefill, decode.
    let phase = |name: &'static str| {
        let (c, trace, parent) = (
            &collector,
            payload.trace_id.clone(),
            payload.span_id.clone(),
        );
        async move {
            wait_for(Duration::from_secs(10), name, || {
                let found = c
                    .spans()
                    .into_iter()
                    .find(|s| s.name == name && s.trace_id == trace && s.parent_span_id == parent);
                async move { found }
            })
            .await
        }
    };
    let queued = phase("engine.queued").await?;
    assert_eq!(queued.attr("preempted"), Some("false"));
    let prefill = phase("engine.prefill").await?;
    assert_eq!(prefill.attr("prompt_tokens"), Some(input.as_str()));
    assert_eq!(prefill.attr("cached_tokens"), Some("0"));
    let decode = phase("engine.decode").await?;
    assert_eq!(decode.attr("tokens"), Some("4"));
    assert_eq!(decode.attr("steps"), Some("4"));

    // A request refused before generation is logged too, with its status.
    let xid2 = "test-trace-002";
    let r = chat(
        &s,
        &[("x-request-id", xid2)],
        json!({"model": "nope", "messages": []}),
    )
    .await?;
    assert_eq!(r.status(), 404);
    let done = wait_for(Duration::from_secs(10), "the 404's completion line", || {
        let done = lines_with(&s.frontend.output(), xid2, "request completed");
        async move { (!done.is_empty()).then_some(done) }
    })
    .await?;
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0]["status"].as_u64(), done[0]["outcome"].as_str()),
        (Some(404), Some("error"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_directive_turns_the_request_lines_off() -> Result<()> {
    // The runtime's own debug lines stay on: the worker's is written after the request's
    // stream is gone, so once it is there, a request line would have been too.
    let s = start(&[
        ("DYN_LOGGING_JSONL", "true"),
        (
            "DYN_LOG",
            "info,tandem_runtime=debug,tandem_frontend::request=off,tandem_worker::request=off",
        ),
    ])
    .await?;
    let xid = "test-quiet-001";
    assert_eq!(
        chat(&s, &[("x-request-id", xid)], body(2)).await?.status(),
        200
    );
    wait_for(
        Duration::from_secs(10),
        "the runtime's completion line",
        || {
            let lines = log_lines(&s.worker.output(), xid);
            async move {
                lines
                    .iter()
                    .any(|l| {
                        l["message"] == "request completed"
                            && l["target"] != "tandem_worker::request"
                    })
                    .then_some(())
            }
        },
    )
    .await?;
    for out in [s.frontend.output(), s.worker.output()] {
        let lines = log_lines(&out, xid);
        assert!(
            lines
                .iter()
                .all(|l| l["target"] != "tandem_frontend::request"
                    && l["target"] != "tandem_worker::request"),
            "{lines:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sampling_ratio_of_zero_exports_nothing_but_logs_keep_their_trace_ids() -> Result<()> {
    let collector = Collector::start().await?;
    let endpoint = collector.endpoint();
    let s = start(&[
        ("OTEL_EXPORT_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ("DYN_LOGGING_JSONL", "true"),
    ])
    .await?;
    let xid = "test-unsampled-001";
    assert_eq!(
        chat(&s, &[("x-request-id", xid)], body(2)).await?.status(),
        200
    );
    // A caller that sampled its trace is followed (parent-based): once its spans are in, the
    // first request's would have been too.
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let tp = format!("00-{trace}-{parent}-01");
    let xid2 = "test-sampled-002";
    assert_eq!(
        chat(
            &s,
            &[("x-request-id", xid2), ("traceparent", tp.as_str())],
            body(2)
        )
        .await?
        .status(),
        200
    );
    wait_span(&collector, "http-request", xid2, |_| true).await?;
    wait_span(&collector, "handle_payload", xid2, |_| true).await?;
    let unsampled: Vec<String> = collector
        .spans()
        .into_iter()
        .filter(|s| s.attr("x_request_id") == Some(xid))
        .map(|s| s.name)
        .collect();
    assert!(unsampled.is_empty(), "{unsampled:?}");

    let front = wait_for(Duration::from_secs(10), "frontend line", || {
        let l = lines_with(&s.frontend.output(), xid, "request completed");
        async move { l.into_iter().next() }
    })
    .await?;
    let id = front["trace_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_ne!(id, "0".repeat(32));
    let worker = wait_for(Duration::from_secs(10), "worker line", || {
        let l = lines_with(&s.worker.output(), xid, "request completed");
        async move { l.into_iter().next() }
    })
    .await?;
    assert_eq!(
        worker["trace_id"],
        id.as_str(),
        "the unsampled trace's id reaches the worker"
    );
    Ok(())
}

/// Waits for a log record from `service` whose body is `body` in trace `trace`.
async fn wait_log(
    c: &Collector,
    service: &str,
    body: &str,
    trace: &str,
) -> Result<tandem_tests::otlp::LogRecord> {
    wait_for(
        Duration::from_secs(20),
        &format!("{service} log record {body:?}"),
        || {
            let found = c
                .logs()
                .into_iter()
                .find(|l| l.service == service && l.body == body && l.trace_id == trace);
            async move { found }
        },
    )
    .await
}

/// Logs and spans over OTLP, with `env` choosing the transport.
async fn logs_arrive_with_their_ids(
    collector: &Collector,
    env: &[(&str, &str)],
    xid: &str,
) -> Result<()> {
    let mut all = vec![
        ("OTEL_EXPORT_ENABLED", "true"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_BLRP_SCHEDULE_DELAY", "100"),
    ];
    all.extend_from_slice(env);
    let s = start(&all).await?;
    assert_eq!(
        chat(&s, &[("x-request-id", xid)], body(3)).await?.status(),
        200
    );
    let http = wait_span(collector, "http-request", xid, |_| true).await?;
    let payload = wait_span(collector, "handle_payload", xid, |_| true).await?;
    let front = wait_log(
        collector,
        "dynamo-frontend",
        "request completed",
        &http.trace_id,
    )
    .await?;
    assert_eq!(front.span_id, http.span_id);
    assert_eq!(front.severity, "INFO");
    assert_eq!(
        front.attributes.get("output_tokens").map(String::as_str),
        Some("3")
    );
    let worker = wait_log(collector, "worker", "request completed", &http.trace_id).await?;
    assert_eq!(worker.span_id, payload.span_id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn log_records_go_over_otlp_grpc_with_trace_and_span_ids() -> Result<()> {
    let collector = Collector::start().await?;
    let endpoint = collector.endpoint();
    logs_arrive_with_their_ids(
        &collector,
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &endpoint),
        ],
        "test-logs-grpc",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_and_log_records_go_over_otlp_http_protobuf() -> Result<()> {
    let collector = Collector::start().await?;
    let base = collector.http_endpoint();
    logs_arrive_with_their_ids(
        &collector,
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &base),
        ],
        "test-logs-http",
    )
    .await
}
