#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! `frontend --router-mode kv` with several real workers (mocker engine) over real nats-server
//! and etcd: routing to the cached worker, spreading load, resynchronising, forgetting dead
//! workers, approximate mode and ZMQ events.

use anyhow::Result;
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;
use tandem_runtime::{DistributedRuntime, EndpointId, RequestOptions, RouterMode};
use tandem_tests::{
    BUNDLED_MODEL_NAME, Cluster, free_port, metric_value, mocker_args, scrape, wait_for,
};

const MODEL: &str = BUNDLED_MODEL_NAME;

/// A prompt of `n` token ids starting at `base` (plain vocabulary ids).
fn tokens(base: u32, n: u32) -> Vec<u32> {
    (base..base + n).collect()
}

async fn complete(c: &Cluster, prompt: &[u32], max_tokens: u32) -> Result<Value> {
    let r = reqwest::Client::new()
        .post(c.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}))
        .send()
        .await?;
    anyhow::ensure!(
        r.status() == 200,
        "status {}: {}",
        r.status(),
        r.text().await?
    );
    Ok(r.json().await?)
}

/// Runs `prompt` on worker `worker_id` directly over the runtime, bypassing the frontend, so
/// that worker (and only it) caches the prompt's blocks.
async fn warm_directly(c: &Cluster, worker_id: u64, prompt: &[u32]) -> Result<()> {
    let drt = DistributedRuntime::connect(c.stack.runtime_config()).await?;
    let client = drt
        .endpoint(EndpointId::new("dynamo", "backend", "generate")?)
        .client();
    client
        .wait_for(Duration::from_secs(10), |v| {
            v.iter().any(|i| i.instance_id == worker_id)
        })
        .await?;
    let body = json!({"model": MODEL, "token_ids": prompt, "stop": {"max_tokens": 1}});
    let mut s = client
        .generate(
            RouterMode::Direct(worker_id),
            serde_json::to_vec(&body)?.into(),
            RequestOptions::default(),
        )
        .await?;
    while let Some(item) = s.next().await {
        item?;
    }
    drt.shutdown().await;
    Ok(())
}

async fn frontend_metric(c: &Cluster, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = scrape(&c.url("/metrics")).await.ok()?;
    metric_value(&text, name, labels)
}

/// Waits until the frontend's index holds at least `blocks` blocks of `worker_id`.
async fn wait_indexed(c: &Cluster, worker_id: u64, blocks: f64) -> Result<()> {
    let id = worker_id.to_string();
    wait_for(
        Duration::from_secs(15),
        "blocks in the router's index",
        || {
            let id = id.clone();
            async move {
                let v = frontend_metric(
                    c,
                    "dynamo_component_kv_router_tree_blocks",
                    &[("worker_id", &id)],
                )
                .await?;
                (v >= blocks).then_some(())
            }
        },
    )
    .await
}

/// Which workers' `served` counters grew between `before` and now.
async fn delta(c: &Cluster, before: &[f64]) -> Result<Vec<f64>> {
    Ok(c.served_all()
        .await?
        .iter()
        .zip(before)
        .map(|(a, b)| a - b)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_routing_follows_the_cache_spreads_load_resyncs_and_forgets_dead_workers() -> Result<()>
{
    let c = Cluster::start(
        3,
        |_| mocker_args(&[]),
        &["--router-mode", "kv"],
        Duration::from_secs(30),
    )
    .await?;
    let ids = [
        c.worker_id(0).await?,
        c.worker_id(1).await?,
        c.worker_id(2).await?,
    ];
    let b = ids[1];

    // 1. A prefix cached on worker B (and nowhere else) sends the request to B.
    let prefix = tokens(1000, 160);
    warm_directly(&c, b, &prefix).await?;
    wait_indexed(&c, b, 10.0).await?;
    let before = c.served_all().await?;
    let mut prompt = prefix.clone();
    prompt.extend(tokens(5000, 20));
    let v = complete(&c, &prompt, 2).await?;
    assert_eq!(delta(&c, &before).await?, vec![0.0, 1.0, 0.0]);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 160);

    // 2. Concurrent requests with distinct prompts spread evenly (load is registered before
    //    dispatch, so simultaneous decisions see each other).
    let before = c.served_all().await?;
    let reqs = (0..30u32).map(|i| {
        let p = tokens(10_000 + i * 100, 64);
        let c = &c;
        async move { complete(c, &p, 30).await }
    });
    for r in futures::future::join_all(reqs).await {
        r?;
    }
    let d = delta(&c, &before).await?;
    assert_eq!(d.iter().sum::<f64>(), 30.0);
    assert!(d.iter().all(|&n| (7.0..=13.0).contains(&n)), "spread {d:?}");
    assert_eq!(
        frontend_metric(
            &c,
            "dynamo_frontend_worker_active_decode_blocks",
            &[("worker_id", &b.to_string())]
        )
        .await,
        Some(0.0),
        "every request's load was released"
    );

    // 3. An event-id gap makes the router refetch the worker's state (counted); the index
    //    still holds B's blocks afterwards and routing is unchanged.
    let nats = async_nats::connect(c.stack.nats.url()).await?;
    let bogus = json!({"worker_id": b, "event": {"event_id": 1_000_000u64, "data": "cleared", "dp_rank": 0}});
    nats.publish(
        "namespace.dynamo.component.backend.kv_events",
        serde_json::to_vec(&bogus)?.into(),
    )
    .await?;
    nats.flush().await?;
    wait_for(Duration::from_secs(10), "a gap resync", || async {
        let v = frontend_metric(
            &c,
            "dynamo_component_kv_router_resyncs_total",
            &[("reason", "gap")],
        )
        .await?;
        (v >= 1.0).then_some(())
    })
    .await?;
    wait_indexed(&c, b, 10.0).await?;
    let before = c.served_all().await?;
    complete(&c, &prompt, 2).await?;
    assert_eq!(delta(&c, &before).await?, vec![0.0, 1.0, 0.0]);

    // 4. A dead worker leaves the index; its prefix then goes elsewhere and succeeds.
    let mut c = c;
    c.workers[1].kill();
    c.wait_workers(2, Duration::from_secs(15)).await?;
    let id = b.to_string();
    wait_for(
        Duration::from_secs(10),
        "the dead worker to leave the index",
        || {
            let id = id.clone();
            let c = &c;
            async move {
                let text = scrape(&c.url("/metrics")).await.ok()?;
                metric_value(
                    &text,
                    "dynamo_component_kv_router_tree_blocks",
                    &[("worker_id", &id)],
                )
                .is_none()
                .then_some(())
            }
        },
    )
    .await?;
    let v = complete(&c, &prompt, 2).await?;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_frontend_learns_the_workers_caches_from_their_state() -> Result<()> {
    let mut c = Cluster::start(
        2,
        |_| mocker_args(&[]),
        &["--router-mode", "kv"],
        Duration::from_secs(30),
    )
    .await?;
    let b = c.worker_id(1).await?;
    let prefix = tokens(2000, 160);
    warm_directly(&c, b, &prefix).await?;
    wait_indexed(&c, b, 10.0).await?;

    // Replace the frontend: the new one has seen none of the events.
    c.frontend.kill();
    let (frontend, http) = c
        .stack
        .spawn_frontend("frontend2", &["--router-mode", "kv"], &[])?;
    c.frontend = frontend;
    c.http = http;
    c.wait_workers(2, Duration::from_secs(30)).await?;
    wait_indexed(&c, b, 10.0).await?;
    assert!(
        frontend_metric(
            &c,
            "dynamo_component_kv_router_resyncs_total",
            &[("reason", "joined")]
        )
        .await
        .unwrap_or(0.0)
            >= 2.0,
        "one state fetch per worker"
    );
    let before = c.served_all().await?;
    let mut prompt = prefix;
    prompt.extend(tokens(6000, 8));
    complete(&c, &prompt, 2).await?;
    assert_eq!(delta(&c, &before).await?, vec![0.0, 1.0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn approximate_mode_sends_repeats_to_the_same_worker_without_events() -> Result<()> {
    let c = Cluster::start(
        3,
        |_| mocker_args(&["--is-decode-worker"]),
        &["--router-mode", "kv", "--no-kv-events"],
        Duration::from_secs(30),
    )
    .await?;
    let prompt = tokens(3000, 200);
    let before = c.served_all().await?;
    for _ in 0..5 {
        complete(&c, &prompt, 2).await?;
    }
    let d = delta(&c, &before).await?;
    assert_eq!(d.iter().sum::<f64>(), 5.0);
    assert!(d.contains(&5.0), "all repeats on one worker: {d:?}");
    // The workers publish nothing (decode workers), so the router applied no event.
    let text = scrape(&c.url("/metrics")).await?;
    assert!(
        !text.contains("dynamo_component_kv_cache_events_applied{"),
        "no events consumed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn zmq_events_reach_a_vllm_style_consumer_and_feed_the_router() -> Result<()> {
    let ports = [free_port()?, free_port()?];
    let c = Cluster::start(
        2,
        |i| {
            let cfg = format!(
                r#"{{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://127.0.0.1:{}","enable_kv_cache_events":true}}"#,
                ports[i]
            );
            mocker_args(&["--kv-events-config", &cfg])
        },
        &["--router-mode", "kv", "--kv-events-source", "zmq"],
        Duration::from_secs(30),
    )
    .await?;
    let b = c.worker_id(1).await?;

    // A consumer written against vLLM's event types (pyzmq + msgspec) reads worker B's socket.
    let python = tandem_tests::repo_root().join(".venv/bin/python");
    let script = tandem_tests::repo_root().join("tests/python/kv_events_subscriber.py");
    let mut consumer = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("tcp://127.0.0.1:{}", ports[1]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        consumer.stdout.take().unwrap(),
    ));
    // The consumer says when it is subscribed; ZMQ drops what a subscriber was not there for.
    let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await??;
    assert_eq!(ready.as_deref(), Some("subscribed"));

    // Keep the request path honest: warm B with fresh prompts until the consumer has decoded
    // a BlockStored (the PUB/SUB handshake may still be settling for the first one).
    let mut found = None;
    for k in 0..10u32 {
        let prefix = tokens(4000 + k * 1000, 160);
        warm_directly(&c, b, &prefix).await?;
        let line = tokio::time::timeout(Duration::from_secs(3), lines.next_line()).await;
        if let Ok(Ok(Some(line))) = line {
            found = Some((prefix, line));
            break;
        }
    }
    let (prefix, line) = found.expect("an event from the PUB socket");
    let stored: Value = serde_json::from_str(&line)?;
    assert_eq!(stored["topic"], "kv-events");
    assert_eq!(stored["type"], "BlockStored");
    assert_eq!(stored["block_size"], 16);
    assert_eq!(stored["num_blocks"], 10);
    assert_eq!(stored["medium"], "GPU");
    let toks: Vec<u32> = serde_json::from_value(stored["token_ids"].clone())?;
    assert_eq!(toks, prefix);

    // The router, fed only by ZMQ (the frontend reads no NATS events in this mode), routes
    // the prefix to B.
    wait_indexed(&c, b, 10.0).await?;
    let applied = frontend_metric(
        &c,
        "dynamo_component_kv_cache_events_applied",
        &[("event_type", "stored"), ("status", "ok")],
    )
    .await
    .unwrap_or(0.0);
    assert!(applied >= 1.0, "stored events applied from ZMQ: {applied}");
    let before = c.served_all().await?;
    let mut prompt = prefix;
    prompt.extend(tokens(7000, 8));
    complete(&c, &prompt, 2).await?;
    assert_eq!(delta(&c, &before).await?, vec![0.0, 1.0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn real_engine_repeat_of_a_long_prompt_lands_where_its_cache_is() -> Result<()> {
    let c = Cluster::start(
        2,
        |_| vec!["--kv-cache-blocks".to_string(), "256".to_string()],
        &["--router-mode", "kv"],
        Duration::from_secs(120),
    )
    .await?;
    let long = "The history of the city spans many centuries, with markets, bridges, \
                libraries and harbours built and rebuilt by each generation. "
        .repeat(12);
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("{long}Summarise this in one sentence.")}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let chat = || async {
        let r = reqwest::Client::new()
            .post(c.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "status {}", r.status());
        Ok::<Value, anyhow::Error>(r.json().await?)
    };
    let before = c.served_all().await?;
    let first = chat().await?;
    let d1 = delta(&c, &before).await?;
    let w = d1
        .iter()
        .position(|&n| n == 1.0)
        .expect("one worker served it");
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 200, "{prompt_tokens}");
    // The router learns the blocks from the worker's events.
    let wid = c.worker_id(w).await?;
    wait_indexed(&c, wid, (prompt_tokens / 16) as f64 - 1.0).await?;
    let before = c.served_all().await?;
    let second = chat().await?;
    let d2 = delta(&c, &before).await?;
    assert_eq!(d2[w], 1.0, "the repeat went to worker {w}: {d2:?}");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= prompt_tokens / 16 * 16 - 16,
        "cached {cached} of {prompt_tokens}"
    );
    assert_eq!(
        first["choices"][0]["message"],
        second["choices"][0]["message"]
    );
    Ok(())
}
