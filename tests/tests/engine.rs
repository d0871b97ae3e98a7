#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! frontend + candle-engine worker (default settings, bundled model) as real processes over
//! real nats-server and etcd: real answers, prefix reuse visible in usage and kvstats.

use anyhow::Result;
use serde_json::{Value, json};
use std::time::Duration;
use tandem_tests::{BUNDLED_MODEL_NAME, Served, metric_value, scrape, wait_for};

const MODEL: &str = BUNDLED_MODEL_NAME;

async fn chat(s: &Served, messages: Value, max_tokens: u32) -> Result<Value> {
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": messages, "max_tokens": max_tokens}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    Ok(r.json().await?)
}

async fn kvstat(s: &Served, name: &str) -> Result<f64> {
    let text = scrape(&s.system_url("/metrics")).await?;
    metric_value(&text, name, &[]).ok_or_else(|| anyhow::anyhow!("{name} not exported"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_model_answers_and_reuses_cached_prefixes() -> Result<()> {
    // Default engine settings; loading and the start-up warm-up take a while in debug builds.
    let s = Served::start(&[], &[], Duration::from_secs(120)).await?;
    // The engine is the default and publishes its cache in the model card's runtime config.
    assert!(kvstat(&s, "dynamo_component_kvstats_total_blocks").await? > 0.0);

    let v = chat(
        &s,
        json!([{"role": "user", "content": "What is the capital of France?"}]),
        32,
    )
    .await?;
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(answer.contains("Paris"), "answer: {answer}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 32);

    // A long shared system prompt: the second request computes only what follows it.
    let system =
        "You are a patient geography teacher. You answer in one short sentence. ".repeat(6);
    let ask =
        |q: &str| json!([{"role": "system", "content": system}, {"role": "user", "content": q}]);
    let first = chat(&s, ask("What is the capital of Italy?"), 8).await?;
    let hit_before = kvstat(&s, "dynamo_component_kvstats_gpu_prefix_cache_hit_rate").await?;
    let second = chat(&s, ask("What is the capital of Spain?"), 8).await?;
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        first["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        0
    );
    assert!(
        cached >= 80 && cached % 16 == 0 && cached < prompt,
        "cached {cached} of {prompt}"
    );
    let hit_after = kvstat(&s, "dynamo_component_kvstats_gpu_prefix_cache_hit_rate").await?;
    assert!(
        hit_after > hit_before,
        "hit rate {hit_before} -> {hit_after}"
    );

    wait_for(
        Duration::from_secs(10),
        "active blocks back to 0",
        || async {
            (kvstat(&s, "dynamo_component_kvstats_active_blocks")
                .await
                .ok()?
                == 0.0)
                .then_some(())
        },
    )
    .await?;
    Ok(())
}
