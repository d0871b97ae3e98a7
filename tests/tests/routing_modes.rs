//! Dynamo's other router modes and session affinity, through a real frontend and three mocker
//! workers: `least-loaded` spreads concurrent requests evenly, `power-of-two` never leaves a
//! worker idle while others queue, and requests with one `X-Dynamo-Session-ID` stay on one
//! worker while the rest round-robin.

use anyhow::Result;
use serde_json::json;
use std::time::Duration;
use tandem_tests::{BUNDLED_MODEL_NAME as MODEL, Cluster, slow_mocker_args};

async fn complete(c: &Cluster, max_tokens: u32, session: Option<&str>) -> Result<()> {
    let mut r = reqwest::Client::new()
        .post(c.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens}));
    if let Some(s) = session {
        r = r.header("X-Dynamo-Session-ID", s);
    }
    let r = r.send().await?;
    anyhow::ensure!(r.status() == 200, "status {}", r.status());
    Ok(())
}

/// Served requests per worker since `before`.
async fn served_since(c: &Cluster, before: &[f64]) -> Result<Vec<u64>> {
    Ok(c.served_all()
        .await?
        .iter()
        .zip(before)
        .map(|(a, b)| (a - b) as u64)
        .collect())
}

/// `n` requests at once, each long enough (~1 s) to still run when the last is routed.
async fn burst(c: &Cluster, n: usize) -> Result<()> {
    let all = (0..n).map(|_| complete(c, 100, None));
    for r in futures::future::join_all(all).await {
        r?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_and_power_of_two_spread_a_burst() -> Result<()> {
    for (mode, check) in [
        ("least-loaded", "evenly"),
        ("power-of-two", "no worker idle"),
    ] {
        let c = Cluster::start(
            3,
            |_| slow_mocker_args(),
            &["--router-mode", mode],
            Duration::from_secs(60),
        )
        .await?;
        let before = c.served_all().await?;
        burst(&c, 9).await?;
        let got = served_since(&c, &before).await?;
        assert_eq!(got.iter().sum::<u64>(), 9, "{mode}: {got:?}");
        match check {
            "evenly" => assert_eq!(got, vec![3, 3, 3], "{mode}"),
            _ => assert!(got.iter().all(|n| *n >= 1 && *n <= 5), "{mode}: {got:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_on_its_worker_while_others_round_robin() -> Result<()> {
    let c = Cluster::start(
        3,
        |_| slow_mocker_args(),
        &["--router-mode", "round-robin"],
        Duration::from_secs(60),
    )
    .await?;
    let before = c.served_all().await?;
    for _ in 0..6 {
        complete(&c, 2, Some("chat-42")).await?;
    }
    let got = served_since(&c, &before).await?;
    assert_eq!(
        got.iter().filter(|n| **n > 0).count(),
        1,
        "one worker: {got:?}"
    );
    assert_eq!(got.iter().sum::<u64>(), 6);
    let before = c.served_all().await?;
    for _ in 0..6 {
        complete(&c, 2, None).await?;
    }
    assert_eq!(
        served_since(&c, &before).await?,
        vec![2, 2, 2],
        "no session: round-robin"
    );
    Ok(())
}
