#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Infrastructure restarts under load, as a client sees them: nats-server restarted while
//! streams run through a real `frontend` (`--migration-limit`) and two `worker`s. The test
//! prints what it measured (errors, recovery time) as well as asserting on it.

use anyhow::Result;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tandem_tests::{BUNDLED_MODEL_NAME, Cluster, metric_value, scrape};

const MODEL: &str = BUNDLED_MODEL_NAME;

/// The mocker at half Dynamo's timing: ~10 ms a decode step.
fn slow_mocker() -> Vec<String> {
    [
        "--engine",
        "mocker",
        "--speedup-ratio",
        "2",
        "--block-size",
        "16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One unary chat; the completion tokens, or the error as text.
async fn chat(url: String, max_tokens: u32) -> Result<u64, String> {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens,
    });
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {v}"));
    }
    v["usage"]["completion_tokens"]
        .as_u64()
        .ok_or_else(|| format!("no usage: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_under_load_loses_no_request_in_flight() -> Result<()> {
    let mut c = Cluster::start(
        2,
        |_| slow_mocker(),
        &["--migration-limit", "3"],
        Duration::from_secs(60),
    )
    .await?;
    let url = c.url("/v1/chat/completions");
    // ~2 s answers, running when NATS goes away for 2 s.
    let in_flight: Vec<_> = (0..8)
        .map(|_| tokio::spawn(chat(url.clone(), 200)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let down = Instant::now();
    c.stack.nats.restart_after(Duration::from_secs(2)).await?;
    let back = Instant::now();
    // New requests: the first success after NATS answers again.
    let recovered = loop {
        match chat(url.clone(), 5).await {
            Ok(5) => break back.elapsed(),
            Ok(n) => anyhow::bail!("short answer: {n} tokens"),
            Err(_) if back.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => anyhow::bail!("no recovery within 30 s: {e}"),
        }
    };
    let mut errors = Vec::new();
    for t in in_flight {
        match t.await? {
            Ok(200) => {}
            other => errors.push(other),
        }
    }
    let moved = metric_value(
        &scrape(&c.url("/metrics")).await?,
        "dynamo_frontend_model_migration_total",
        &[],
    )
    .unwrap_or(0.0);
    println!(
        "NATS restart: down for {:?}; in-flight errors {}/8 ({moved} migrations); first new request answered {:?} after NATS was back",
        back - down,
        errors.len(),
        recovered
    );
    assert!(errors.is_empty(), "in flight: {errors:?}");
    assert!(
        recovered < Duration::from_secs(5),
        "recovery took {recovered:?}"
    );
    Ok(())
}
