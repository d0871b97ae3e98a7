#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Disaggregated serving end to end: the real `frontend`, prefill workers
//! (`--is-prefill-worker`) and decode workers (`--is-decode-worker`) over real nats-server and
//! etcd, KV blocks moving over the workers' TCP data plane.

use anyhow::Result;
use serde_json::{Value, json};
use std::time::Duration;
use tandem_tests::{
    BUNDLED_MODEL_NAME, Cluster, Served, log_lines, metric_value, mocker_args, scrape, wait_for,
};

const MODEL: &str = BUNDLED_MODEL_NAME;
/// The candle engine's default block size.
const BLOCK: u64 = 16;

async fn complete(url: &str, prompt: &str, max_tokens: u32) -> Result<Value> {
    let r = reqwest::Client::new()
        .post(url)
        .json(
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
        )
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    assert_eq!(status, 200, "{v}");
    Ok(v)
}

fn text(v: &Value) -> &str {
    v["choices"][0]["text"].as_str().unwrap()
}

fn prompt_tokens(v: &Value) -> u64 {
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// What the decode worker (position 0) counted so far: prompt tokens it computed, blocks it
/// received.
async fn decode_counts(c: &Cluster) -> Result<(f64, f64)> {
    Ok((
        c.worker_metric(0, "tandem_engine_prompt_tokens_total", &[])
            .await?,
        c.worker_metric(
            0,
            "dynamo_component_kv_transfer_blocks_total",
            &[("direction", "received")],
        )
        .await?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_through_prefill_and_decode_equals_one_aggregated_worker() -> Result<()> {
    let timeout = Duration::from_secs(180);
    let (agg, disagg) = tokio::join!(
        Served::start(&[], &[], timeout),
        Cluster::start_disagg(1, 1, |_, _| vec![], &[], timeout),
    );
    let (agg, c) = (agg?, disagg?);
    let agg_url = agg.url("/v1/completions");
    let url = c.url("/v1/completions");

    let paragraph = "The river runs from the mountains to the sea, past farms, mills and old stone \
        bridges, and every town along it has a story about a flood. ";
    let long = paragraph.repeat(5);
    let longer = format!("{long}Which town remembers the worst flood, and why?");
    let prompts = [
        "The capital of France is".to_string(),
        long.clone(),
        // Shares `long`'s blocks, which the decode worker caches after the previous request.
        longer,
    ];
    let mut last_prompt = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        let expected = complete(&agg_url, prompt, 24).await?;
        let (computed_before, received_before) = decode_counts(&c).await?;
        let got = complete(&url, prompt, 24).await?;
        assert_eq!(
            text(&got),
            text(&expected),
            "prompt {i}: disaggregated vs aggregated"
        );
        assert_eq!(got["usage"], expected["usage"], "prompt {i}: usage");
        let n = prompt_tokens(&got);
        let blocks = n.div_ceil(BLOCK);
        // Scrapes catch up with the engine at the next step; wait for the received count.
        let (computed, received) = wait_for(Duration::from_secs(10), "decode counters", || {
            let c = &c;
            async move {
                let (p, r) = decode_counts(c).await.ok()?;
                (r > received_before).then_some((p, r))
            }
        })
        .await?;
        let computed = (computed - computed_before) as u64;
        let received = (received - received_before) as u64;
        assert!(
            computed < BLOCK,
            "prompt {i}: the decode worker computed {computed} prompt tokens of {n}"
        );
        if i < 2 {
            assert_eq!(received, blocks, "prompt {i}: every prompt block fetched");
        } else {
            // The full blocks of the previous prompt were cached on the decode worker.
            let cached_at_least = (last_prompt / BLOCK).saturating_sub(1);
            assert!(
                received <= blocks - cached_at_least && received < blocks,
                "prompt {i}: fetched {received} of {blocks} blocks; {cached_at_least}+ were cached"
            );
        }
        last_prompt = n;
    }
    // Seeded sampling with penalties too: the decode worker's sampler continues past the draw
    // and the token the prefill worker's made.
    let seeded = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24,
        "temperature": 0.9, "seed": 1234, "frequency_penalty": 0.5});
    let (a, d) = (
        post(agg_url.clone(), seeded.clone()).await?,
        post(url.clone(), seeded).await?,
    );
    let (a, d): (Value, Value) = (a.json().await?, d.json().await?);
    assert_eq!(text(&d), text(&a), "seeded: disaggregated vs aggregated");

    let front = scrape(&c.url("/metrics")).await?;
    assert_eq!(
        metric_value(
            &front,
            "dynamo_frontend_disaggregated_requests_total",
            &[("path", "remote_prefill")]
        ),
        Some(4.0)
    );
    Ok(())
}

/// A prompt of about `words` tokens.
fn long_prompt(words: usize) -> String {
    (0..words).map(|i| format!("w{} ", i % 97)).collect()
}

async fn post(url: String, body: Value) -> Result<reqwest::Response> {
    Ok(reqwest::Client::new().post(url).json(&body).send().await?)
}

/// Waits until worker `i` has no active (and no held) KV blocks.
async fn blocks_freed(c: &Cluster, i: usize, what: &str) -> Result<()> {
    wait_for(Duration::from_secs(15), what, || async move {
        let active = c
            .worker_metric(i, "dynamo_component_kvstats_active_blocks", &[])
            .await
            .ok()?;
        let held = c
            .worker_metric(i, "tandem_engine_held_blocks", &[])
            .await
            .ok()?;
        (active == 0.0 && held == 0.0).then_some(())
    })
    .await
}

/// Waits until worker `i` runs at least one sequence.
async fn running(c: &Cluster, i: usize) -> Result<()> {
    wait_for(
        Duration::from_secs(15),
        "a running sequence",
        || async move {
            let n = c
                .worker_metric(i, "tandem_engine_num_requests_running", &[])
                .await
                .ok()?;
            (n >= 1.0).then_some(())
        },
    )
    .await
}

async fn frontend_paths(c: &Cluster, path: &str) -> Result<f64> {
    let text = scrape(&c.url("/metrics")).await?;
    Ok(metric_value(
        &text,
        "dynamo_frontend_disaggregated_requests_total",
        &[("path", path)],
    )
    .unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_return_to_zero_after_completion_and_client_disconnects() -> Result<()> {
    use futures::StreamExt;
    // A slow prefill worker (a step takes about half a second) and a decode worker at real mocker
    // speed (about 6 ms a token): both legs are long enough to walk away from.
    let c = Cluster::start_disagg(
        1,
        1,
        |prefill, _| {
            let speed = if prefill { "0.05" } else { "1" };
            let mut a = mocker_args(&[]);
            a[3] = speed.to_string();
            a
        },
        &[],
        Duration::from_secs(30),
    )
    .await?;
    let (decode, prefill) = (0, 1);
    let url = c.url("/v1/completions");

    // Completion.
    let r = post(
        url.clone(),
        json!({"model": MODEL, "prompt": long_prompt(100), "max_tokens": 5}),
    )
    .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(frontend_paths(&c, "remote_prefill").await?, 1.0);
    blocks_freed(&c, decode, "decode blocks freed after completion").await?;
    blocks_freed(&c, prefill, "prefill blocks freed after completion").await?;

    // Disconnect during the prefill leg.
    let request = tokio::spawn(post(
        url.clone(),
        json!({"model": MODEL, "prompt": long_prompt(1500), "max_tokens": 50, "stream": true}),
    ));
    running(&c, prefill).await?;
    assert!(
        c.worker_metric(prefill, "dynamo_component_kvstats_active_blocks", &[])
            .await?
            > 0.0
    );
    request.abort();
    blocks_freed(
        &c,
        prefill,
        "prefill blocks freed after a disconnect in prefill",
    )
    .await?;
    blocks_freed(
        &c,
        decode,
        "decode blocks freed after a disconnect in prefill",
    )
    .await?;

    // Disconnect during the decode leg.
    let r = post(
        url.clone(),
        json!({"model": MODEL, "prompt": long_prompt(200), "max_tokens": 2000, "stream": true}),
    )
    .await?;
    let mut body = r.bytes_stream();
    body.next().await.transpose()?;
    body.next().await.transpose()?;
    assert!(
        c.worker_metric(decode, "dynamo_component_kvstats_active_blocks", &[])
            .await?
            > 0.0
    );
    drop(body);
    blocks_freed(
        &c,
        decode,
        "decode blocks freed after a disconnect in decode",
    )
    .await?;
    blocks_freed(
        &c,
        prefill,
        "prefill blocks freed after a disconnect in decode",
    )
    .await?;
    assert_eq!(
        c.worker_metric(decode, "dynamo_component_kv_transfer_failures_total", &[])
            .await?
            + c.worker_metric(prefill, "dynamo_component_kv_transfer_failures_total", &[])
                .await?,
        0.0,
        "no transfer failed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_killed_before_fetching_costs_the_prefill_worker_nothing() -> Result<()> {
    let mut c = Cluster::start_disagg(
        1,
        1,
        |prefill, _| {
            let mut a = mocker_args(&[]);
            if prefill {
                // Only the frontend's release can free the blocks within the test (the hold's
                // own expiry is tested in crates/worker's data-plane tests).
                a.extend(["--kv-transfer-timeout".into(), "600".into()]);
            }
            a
        },
        &[],
        Duration::from_secs(30),
    )
    .await?;
    let (decode, prefill) = (0, 1);
    // Killed without a goodbye: its card stays in etcd until its lease (2 s) expires, so the
    // next request still goes to it after its prefill leg, and finds nobody there.
    c.workers[decode].kill();
    let r = post(
        c.url("/v1/completions"),
        json!({"model": MODEL, "prompt": long_prompt(100), "max_tokens": 5}),
    )
    .await?;
    assert!(r.status().is_server_error(), "{}", r.status());
    assert_eq!(frontend_paths(&c, "remote_prefill").await?, 1.0);
    blocks_freed(&c, prefill, "held blocks freed by the frontend's release").await?;
    assert_eq!(
        c.worker_metric(
            prefill,
            "dynamo_component_kv_transfer_failures_total",
            &[("reason", "expired")]
        )
        .await?,
        0.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_killed_during_or_before_its_leg_costs_no_answer() -> Result<()> {
    let mut c = Cluster::start_disagg(
        1,
        1,
        |prefill, _| {
            let mut a = mocker_args(&[]);
            if prefill {
                a[3] = "0.05".into();
            }
            a
        },
        &[],
        Duration::from_secs(30),
    )
    .await?;
    let (decode, prefill) = (0, 1);
    let url = c.url("/v1/completions");

    // Killed during the leg.
    let request = tokio::spawn(post(
        url.clone(),
        json!({"model": MODEL, "prompt": long_prompt(1500), "max_tokens": 5}),
    ));
    running(&c, prefill).await?;
    c.workers[prefill].kill();
    let r = request.await??;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await?;
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(frontend_paths(&c, "fallback").await?, 1.0);
    blocks_freed(&c, decode, "decode blocks freed after a fallback").await?;

    // A new prefill worker, killed before its leg.
    c.wait_gauge(
        "dynamo_frontend_model_prefill_workers",
        0,
        Duration::from_secs(15),
    )
    .await?;
    let args: Vec<String> = ["--is-prefill-worker".to_string()]
        .into_iter()
        .chain(mocker_args(&[]))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut second, _) =
        c.stack
            .spawn_worker("prefill-second", &args, &[("DYN_LEASE_TTL_SECS", "2")])?;
    c.wait_gauge(
        "dynamo_frontend_model_prefill_workers",
        1,
        Duration::from_secs(30),
    )
    .await?;
    second.kill();
    let r = post(
        url.clone(),
        json!({"model": MODEL, "prompt": long_prompt(100), "max_tokens": 5}),
    )
    .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(frontend_paths(&c, "fallback").await?, 2.0);
    blocks_freed(&c, decode, "decode blocks freed after the second fallback").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_the_frontend_the_prefill_leg_and_the_decode_leg() -> Result<()> {
    use tandem_tests::otlp::{Collector, Span};
    let collector = Collector::start().await?;
    let endpoint = collector.endpoint();
    let c = Cluster::start_disagg_env(
        1,
        1,
        |_, _| mocker_args(&[]),
        &["--router-mode", "kv"],
        &[
            ("OTEL_EXPORT_ENABLED", "true"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("DYN_LOGGING_JSONL", "true"),
            ("DYN_LOG", "info,tandem_runtime=debug,tandem_frontend=debug"),
        ],
        Duration::from_secs(30),
    )
    .await?;
    let (decode, prefill) = (0, 1);
    let xid = "disagg-trace-001";
    let r = reqwest::Client::new()
        .post(c.url("/v1/chat/completions"))
        .header("x-request-id", xid)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about tracing."}], "max_tokens": 5}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);

    let find = |name: &'static str, pred: Box<dyn Fn(&Span) -> bool + Send + Sync>| {
        let collector = &collector;
        async move {
            wait_for(Duration::from_secs(20), &format!("span {name}"), || {
                let found = collector
                    .spans()
                    .into_iter()
                    .find(|s| s.name == name && pred(s));
                async move { found }
            })
            .await
        }
    };
    let http = find(
        "http-request",
        Box::new(move |s| s.attr("x_request_id") == Some(xid)),
    )
    .await?;
    assert_eq!(http.service, "dynamo-frontend");
    let trace = http.trace_id.clone();
    let (t, parent) = (trace.clone(), http.span_id.clone());
    let routing = find(
        "prefill_routing",
        Box::new(move |s| s.trace_id == t && s.parent_span_id == parent),
    )
    .await?;
    assert_eq!(routing.service, "dynamo-frontend");
    assert_eq!(routing.attr("path"), Some("remote_prefill"));
    let prefill_id = c.worker_id(prefill).await?.to_string();
    assert_eq!(routing.attr("prefill_worker_id"), Some(prefill_id.as_str()));

    // Each leg: the frontend's client_request, then the worker's handle_payload under it.
    let leg = |service: &'static str, parent: String| {
        let t = trace.clone();
        async move {
            let t2 = t.clone();
            let client = find(
                "client_request",
                Box::new(move |s| s.trace_id == t && s.parent_span_id == parent),
            )
            .await?;
            let client_id = client.span_id.clone();
            let payload = find(
                "handle_payload",
                Box::new(move |s| {
                    s.trace_id == t2 && s.service == service && s.parent_span_id == client_id
                }),
            )
            .await?;
            anyhow::Ok((client, payload))
        }
    };
    let (_, prefill_payload) = leg("dynamo-worker-prefill", routing.span_id.clone()).await?;
    assert_eq!(prefill_payload.attr("component"), Some("prefill"));
    let (_, decode_payload) = leg("dynamo-worker-decode", http.span_id.clone()).await?;
    assert_eq!(decode_payload.attr("component"), Some("backend"));
    // The KV router's spans (Dynamo's names), for the prefill choice and the decode choice.
    for name in [
        "kv_router.route_request",
        "kv_router.compute_block_hashes",
        "kv_router.compute_seq_hashes",
        "kv_router.find_matches",
        "kv_router.schedule",
        "kv_router.select_worker",
    ] {
        let t = trace.clone();
        let n = collector
            .spans()
            .iter()
            .filter(|s| s.name == name && s.trace_id == t)
            .count();
        assert_eq!(n, 2, "{name}: one per leg");
    }
    let t = trace.clone();
    let transfer = find("kv_transfer", Box::new(move |s| s.trace_id == t)).await?;
    assert_eq!(transfer.service, "dynamo-worker-decode");
    assert_eq!(
        transfer.attr("prefill_worker_id"),
        Some(prefill_id.as_str())
    );

    // The three processes' JSONL logs for the request carry the one trace id.
    for (who, i) in [
        ("frontend", None),
        ("prefill worker", Some(prefill)),
        ("decode worker", Some(decode)),
    ] {
        let lines = wait_for(Duration::from_secs(10), &format!("{who} log lines"), || {
            let out = match i {
                None => c.frontend.output(),
                Some(i) => c.workers[i].output(),
            };
            let lines = log_lines(&out, xid);
            async move { (!lines.is_empty()).then_some(lines) }
        })
        .await?;
        assert!(
            lines.iter().all(|l| l["trace_id"] == trace.as_str()),
            "{who}: {lines:?}"
        );
    }
    Ok(())
}

/// Kills a whole process group when dropped (the script and everything it started).
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

/// Four consecutive free ports (the script's system ports).
fn free_run_of_four() -> Result<u16> {
    use std::net::TcpListener;
    for _ in 0..50 {
        let base = tandem_tests::free_port()?;
        if base < 60000 && (0..4).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    anyhow::bail!("no run of four free ports")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagg_script_starts_two_prefill_and_two_decode_workers_and_answers() -> Result<()> {
    use std::os::unix::process::CommandExt;
    use tandem_tests::{Proc, free_port, repo_root};
    let collector = tandem_tests::otlp::Collector::start().await?;
    let dir = tempfile::Builder::new()
        .prefix("tandem-disagg-sh-")
        .tempdir()?;
    let (http, base) = (free_port()?, free_run_of_four()?);
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(repo_root().join("scripts/disagg.sh"))
        .env("RUN_DIR", dir.path().join("run"))
        // scripts/test.sh built them; a build here would contend for cargo's lock.
        .env("SKIP_BUILD", "1")
        .env("NATS_PORT", free_port()?.to_string())
        .env("ETCD_PORT", free_port()?.to_string())
        .env("ETCD_PEER_PORT", free_port()?.to_string())
        .env("HTTP_PORT", http.to_string())
        .env("SYSTEM_PORT_BASE", base.to_string())
        // The mocker: four candle workers would only make this test slow.
        .env(
            "WORKER_ARGS",
            "--engine mocker --speedup-ratio 10 --block-size 16",
        )
        .env("OTEL_EXPORT_ENABLED", "true")
        .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", collector.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .process_group(0);
    let mut script = Proc::spawn("disagg.sh", &mut cmd, dir.path())?;
    let _group = Group(script.pid().unwrap());
    let answer = wait_for(Duration::from_secs(120), "the script's completion", || {
        let out = script.output();
        async move {
            out.lines()
                .find(|l| l.contains("\"chat.completion\""))
                .map(str::to_string)
        }
    })
    .await
    .map_err(|e| e.context(script.output()))?;
    let v: Value = serde_json::from_str(&answer)?;
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let front = scrape(&format!("http://127.0.0.1:{http}/metrics")).await?;
    assert_eq!(
        metric_value(
            &front,
            "dynamo_frontend_disaggregated_requests_total",
            &[("path", "remote_prefill")]
        ),
        Some(1.0)
    );
    let mut components = Vec::new();
    for port in base..base + 4 {
        let text = scrape(&format!("http://127.0.0.1:{port}/metrics")).await?;
        let kvstats = text
            .lines()
            .find(|l| l.starts_with("dynamo_component_kvstats_total_blocks{"))
            .unwrap_or_else(|| panic!("port {port}: {text}"));
        components.push(
            kvstats
                .split("dynamo_component=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(components, ["backend", "backend", "prefill", "prefill"]);
    // Each role exports its spans under its own service name.
    wait_for(Duration::from_secs(20), "spans from every role", || {
        let services: std::collections::BTreeSet<String> =
            collector.spans().into_iter().map(|s| s.service).collect();
        async move {
            [
                "dynamo-frontend",
                "dynamo-worker-decode",
                "dynamo-worker-prefill",
            ]
            .iter()
            .all(|s| services.contains(*s))
            .then_some(())
        }
    })
    .await
    .map_err(|e| {
        let services: std::collections::BTreeSet<String> =
            collector.spans().into_iter().map(|s| s.service).collect();
        e.context(format!("services seen: {services:?}"))
    })?;

    // Ctrl-C (SIGTERM here) stops everything it started.
    script.terminate(Duration::from_secs(30))?;
    wait_for(
        Duration::from_secs(10),
        "the frontend to stop",
        || async move {
            reqwest::get(format!("http://127.0.0.1:{http}/metrics"))
                .await
                .is_err()
                .then_some(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_mismatch_falls_back_and_frees_the_prefill_blocks_at_once() -> Result<()> {
    // Blocks of 32 tokens on the prefill worker, 16 on the decode worker: nothing fetched
    // can be written, so the decode worker computes the prompt itself.
    let c = Cluster::start_disagg(
        1,
        1,
        |prefill, _| {
            let mut a = mocker_args(&[]);
            if prefill {
                a[5] = "32".into();
                // Only the decode worker's refusal can free the blocks within the test.
                a.extend(["--kv-transfer-timeout".into(), "600".into()]);
            }
            a
        },
        &[],
        Duration::from_secs(30),
    )
    .await?;
    let (decode, prefill) = (0, 1);
    let r = post(
        c.url("/v1/completions"),
        json!({"model": MODEL, "prompt": long_prompt(100), "max_tokens": 5}),
    )
    .await?;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await?;
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(
        c.worker_metric(
            decode,
            "dynamo_component_kv_transfer_failures_total",
            &[("reason", "layout_mismatch")]
        )
        .await?,
        1.0
    );
    assert!(
        c.worker_metric(decode, "tandem_engine_prompt_tokens_total", &[])
            .await?
            > 100.0
    );
    blocks_freed(&c, prefill, "prefill blocks freed by the refusal").await?;
    blocks_freed(&c, decode, "decode blocks freed").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_prompts_prefill_locally_and_enforce_disagg_answers_503_when_prefill_fails()
-> Result<()> {
    let mut c = Cluster::start_disagg(
        1,
        1,
        |_, _| mocker_args(&[]),
        &["--enforce-disagg", "--max-local-prefill-length", "64"],
        Duration::from_secs(30),
    )
    .await?;
    let prefill = 1;
    let url = c.url("/v1/completions");
    let ask = |words: usize| json!({"model": MODEL, "prompt": long_prompt(words), "max_tokens": 3});

    // Within the threshold: the decode worker prefills it.
    let r = post(url.clone(), ask(5)).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(frontend_paths(&c, "local_prefill").await?, 1.0);
    assert_eq!(
        c.worker_metric(prefill, "tandem_engine_prompt_tokens_total", &[])
            .await?,
        0.0
    );
    // Beyond it: the prefill worker does.
    let r = post(url.clone(), ask(200)).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(frontend_paths(&c, "remote_prefill").await?, 1.0);

    // The prefill worker dies: with --enforce-disagg that is the client's answer.
    c.workers[prefill].kill();
    let r = post(url.clone(), ask(200)).await?;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await?;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("prefill"), "{message}");
    assert_eq!(frontend_paths(&c, "fallback").await?, 0.0);
    // And once it is gone from discovery, too.
    c.wait_gauge(
        "dynamo_frontend_model_prefill_workers",
        0,
        Duration::from_secs(15),
    )
    .await?;
    let r = post(url.clone(), ask(200)).await?;
    assert_eq!(r.status(), 503);
    Ok(())
}
