#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Disaggregated serving end to end: the real `frontend`, prefill workers
//! (`--is-prefill-worker`) and decode workers (`--is-decode-worker`) over real nats-server and
//! etcd, KV blocks moving over the workers' TCP data plane.

use anyhow::Result;
use serde_json::{Value, json};
use std::time::Duration;
use tandem_tests::{
    BUNDLED_MODEL_NAME, Cluster, Served, metric_value, mocker_args, scrape, wait_for,
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
async fn greedy_output_through_prefill_and_decode_equals_one_aggregated_worker() -> Result<()> {
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
    let front = scrape(&c.url("/metrics")).await?;
    assert_eq!(
        metric_value(
            &front,
            "dynamo_frontend_disaggregated_requests_total",
            &[("path", "remote_prefill")]
        ),
        Some(3.0)
    );
    Ok(())
}
