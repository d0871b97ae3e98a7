#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Request migration end to end: real `frontend` (`--migration-limit`) and `worker`s over real
//! nats-server and etcd; a worker is killed (`kill -9`) or stopped (SIGTERM) while streams
//! run on it, and every client still gets its whole answer, once.

use anyhow::{Context, Result};
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tandem_tests::{BUNDLED_MODEL_NAME, Cluster, metric_value, scrape, slow_mocker_args, wait_for};

const MODEL: &str = BUNDLED_MODEL_NAME;

/// What a client saw of one streamed chat.
#[derive(Debug, Default)]
struct Seen {
    text: String,
    finish: Option<String>,
    completion_tokens: Option<u64>,
    errors: Vec<Value>,
}

/// Streams a chat, counting `started` up once `after` content chunks have arrived.
async fn stream_chat(
    url: String,
    body: Value,
    started: Arc<AtomicUsize>,
    after: usize,
) -> Result<Seen> {
    let r = reqwest::Client::new().post(url).json(&body).send().await?;
    anyhow::ensure!(r.status() == 200, "status {}", r.status());
    let mut bytes = r.bytes_stream();
    let (mut buf, mut seen, mut chunks) = (String::new(), Seen::default(), 0usize);
    while let Some(b) = bytes.next().await {
        buf.push_str(std::str::from_utf8(&b?)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            // `data:` after an optional `event: error` line.
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if v.get("error").is_some() {
                seen.errors.push(v);
                continue;
            }
            if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
                seen.completion_tokens = Some(u);
            }
            let Some(choice) = v["choices"].get(0) else {
                continue;
            };
            if let Some(t) = choice["delta"]["content"].as_str() {
                seen.text.push_str(t);
                chunks += 1;
                if chunks == after {
                    started.fetch_add(1, Ordering::SeqCst);
                }
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                seen.finish = Some(f.to_string());
            }
        }
    }
    Ok(seen)
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

async fn frontend_metric(c: &Cluster, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(metric_value(&scrape(&c.url("/metrics")).await?, name, labels).unwrap_or(0.0))
}

/// Starts `n` streams of `max_tokens` and waits until each has `after` chunks.
async fn start_streams(
    c: &Cluster,
    n: usize,
    max_tokens: u32,
    after: usize,
) -> Result<Vec<tokio::task::JoinHandle<Result<Seen>>>> {
    let started = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let body = chat(&format!("Tell me story number {i}."), max_tokens);
            tokio::spawn(stream_chat(
                c.url("/v1/chat/completions"),
                body,
                started.clone(),
                after,
            ))
        })
        .collect();
    // A readiness wait, not a timing target: on a loaded 2-core machine (the whole suite at
    // once) 16 streams can take well over a minute to reach their first chunks. A stream that
    // ends before it is under way says why at once instead of running into the deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut tasks = tasks;
    loop {
        let now_started = started.load(Ordering::SeqCst);
        if now_started == n {
            return Ok(tasks);
        }
        // A finished stream that failed ends the wait with its reason; one that completed
        // (a short answer can, before the others start) is kept for the caller.
        for (i, task) in tasks.iter_mut().enumerate() {
            if !task.is_finished() {
                continue;
            }
            match (&mut *task).await? {
                Ok(seen) if seen.errors.is_empty() && seen.finish.is_some() => {
                    *task = tokio::spawn(async move { Ok(seen) });
                }
                other => {
                    anyhow::bail!("stream {i} ended before every stream was under way: {other:?}")
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("after 180 s only {now_started} of {n} streams were under way");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn all_complete(
    tasks: Vec<tokio::task::JoinHandle<Result<Seen>>>,
    max_tokens: u64,
) -> Result<()> {
    for (i, t) in tasks.into_iter().enumerate() {
        let seen = t.await??;
        assert!(seen.errors.is_empty(), "stream {i}: {:?}", seen.errors);
        assert_eq!(seen.finish.as_deref(), Some("length"), "stream {i}");
        assert_eq!(
            seen.completion_tokens,
            Some(max_tokens),
            "stream {i}: every token once"
        );
    }
    Ok(())
}

/// Waits until worker `i` holds no KV blocks.
async fn blocks_freed(c: &Cluster, i: usize) -> Result<()> {
    wait_for(Duration::from_secs(15), "blocks back to 0", || async move {
        let active = c
            .worker_metric(i, "dynamo_component_kvstats_active_blocks", &[])
            .await
            .ok()?;
        (active == 0.0).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_of_two_workers_mid_stream_costs_no_answer() -> Result<()> {
    let mut c = Cluster::start(
        2,
        |_| slow_mocker_args(),
        &["--migration-limit", "2"],
        Duration::from_secs(60),
    )
    .await?;
    let tasks = start_streams(&c, 16, 300, 5).await?;
    let on_0 = c
        .worker_metric(0, "tandem_engine_num_requests_running", &[])
        .await?;
    assert!(on_0 >= 1.0, "worker 0 runs some of the streams ({on_0})");
    c.workers[0].kill();
    all_complete(tasks, 300).await?;

    let moved = frontend_metric(
        &c,
        "dynamo_frontend_model_migration_total",
        &[("model", MODEL), ("migration_type", "ongoing_request")],
    )
    .await?;
    assert!(
        moved >= on_0,
        "each stream of the killed worker moved: {moved} < {on_0}"
    );
    let text = scrape(&c.url("/metrics")).await?;
    assert!(
        text.lines().any(|l| l
            .starts_with("dynamo_frontend_model_migration_duration_seconds_count")
            && l.contains("outcome=\"success\"")),
        "migration durations observed"
    );
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_requests_total",
            &[("status", "error")]
        ),
        None,
        "no request failed"
    );
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_model_migration_limit",
            &[("model", MODEL)]
        ),
        Some(2.0)
    );
    blocks_freed(&c, 1).await?;

    // The dead worker is avoided: new requests succeed while its record may still be there.
    let tasks = start_streams(&c, 4, 20, 1).await?;
    all_complete(tasks, 20).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_migration_limit_a_killed_worker_fails_its_streams() -> Result<()> {
    let mut c = Cluster::start(1, |_| slow_mocker_args(), &[], Duration::from_secs(60)).await?;
    let tasks = start_streams(&c, 2, 300, 5).await?;
    c.workers[0].kill();
    for t in tasks {
        let seen = t.await??;
        assert_eq!(seen.errors.len(), 1, "{seen:?}");
        assert_eq!(seen.errors[0]["error"]["type"], "service_unavailable");
        assert_eq!(seen.finish, None);
    }
    assert_eq!(
        frontend_metric(&c, "dynamo_frontend_model_migration_total", &[]).await?,
        0.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_greedy_answer_moved_mid_stream_is_byte_identical() -> Result<()> {
    let mut c = Cluster::start(
        2,
        |_| vec![],
        &["--migration-limit", "1"],
        Duration::from_secs(120),
    )
    .await?;
    let body = chat("Write a short poem about the sea.", 48);
    let url = c.url("/v1/chat/completions");
    let reference = stream_chat(url.clone(), body.clone(), Arc::default(), 0).await?;
    assert_eq!(reference.completion_tokens, Some(48), "{reference:?}");

    let before = c.served_all().await?;
    let started = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(stream_chat(url, body, started.clone(), 8));
    wait_for(Duration::from_secs(60), "8 chunks", || {
        let s = started.clone();
        async move { (s.load(Ordering::SeqCst) == 1).then_some(()) }
    })
    .await?;
    let after = c.served_all().await?;
    let serving = (0..2)
        .find(|i| after[*i] > before[*i])
        .context("the worker serving the stream")?;
    c.workers[serving].kill();
    let moved = task.await??;
    assert!(moved.errors.is_empty(), "{:?}", moved.errors);
    assert_eq!(
        moved.text, reference.text,
        "the same greedy answer, no gap, no repeat"
    );
    assert_eq!(moved.completion_tokens, Some(48));
    assert_eq!(
        frontend_metric(
            &c,
            "dynamo_frontend_model_migration_total",
            &[("migration_type", "ongoing_request")]
        )
        .await?,
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_under_load_hands_its_streams_over() -> Result<()> {
    // A grace period far shorter than the streams: what is still running after it is
    // handed back to the frontend, which continues it on the other worker.
    let mut c = Cluster::start(
        2,
        |i| {
            let mut a = slow_mocker_args();
            if i == 0 {
                a.extend(["--graceful-shutdown-timeout-secs".into(), "0.5".into()]);
            }
            a
        },
        &["--migration-limit", "1"],
        Duration::from_secs(60),
    )
    .await?;
    let tasks = start_streams(&c, 16, 300, 5).await?;
    let status = c.workers[0].terminate(Duration::from_secs(20))?;
    assert!(status.success(), "clean exit: {status:?}");
    all_complete(tasks, 300).await?;
    assert!(
        frontend_metric(
            &c,
            "dynamo_frontend_model_migration_total",
            &[("migration_type", "ongoing_request")]
        )
        .await?
            >= 1.0
    );
    assert!(
        c.workers[0]
            .output()
            .contains("handing the requests still running back"),
        "{}",
        c.workers[0].output()
    );
    blocks_freed(&c, 1).await?;
    Ok(())
}
