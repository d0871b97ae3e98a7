#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! The observability files in deploy/ and dashboards/: compose files valid against the
//! Compose Specification, Prometheus config accepted by promtool, and every dashboard
//! expression answered by a real Prometheus scraping a real local stack.

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use tandem_tests::{
    BUNDLED_MODEL_NAME, Cluster, Proc, free_port, mocker_args, repo_root, tool, wait_for,
};

/// Panels that cannot have data in this test, with the reason.
const NO_DATA_YET: &[(&str, &str)] = &[
    (
        "NATS Server",
        "needs the NATS Prometheus exporter container (docker-observability.yml)",
    ),
    (
        "GPU Utilization / Power",
        "needs the DCGM exporter and an NVIDIA GPU (compose profile gpu)",
    ),
];

fn python() -> std::path::PathBuf {
    repo_root().join(".venv/bin/python")
}

#[test]
fn compose_files_validate_pin_their_images_and_mount_files_that_exist() -> Result<()> {
    let root = repo_root();
    let schema = root.join(".tools/compose_spec.json");
    let script = root.join("tests/python/check_compose.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(&schema)
        .arg(root.join("deploy/docker-compose.yml"))
        .arg(root.join("deploy/docker-observability.yml"))
        .output()
        .context("running check_compose.py (scripts/test.sh sets up .venv)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(files.len(), 2);
    assert_eq!(
        files[0]["services"],
        serde_json::json!(["etcd-server", "nats-server"])
    );
    assert_eq!(
        files[1]["services"],
        serde_json::json!([
            "dcgm-exporter",
            "grafana",
            "loki",
            "nats-prometheus-exporter",
            "otel-collector",
            "prometheus",
            "tempo"
        ])
    );

    // The checker does fail: an unknown key, an unpinned image and a missing mount.
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "services:\n  a:\n    image: nats\n    bogus_key: 1\n    volumes:\n      - ./nope.yml:/x\n",
    )?;
    let out = Command::new(python())
        .arg(&script)
        .arg(&schema)
        .arg(&bad)
        .output()?;
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["problems"].as_array().unwrap().len(), 3, "{v}");
    Ok(())
}

#[test]
fn prometheus_config_passes_promtool() -> Result<()> {
    let promtool = tool("promtool")?;
    let config = repo_root().join("deploy/observability/prometheus.yml");
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(&config)
        .output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "scrape_configs:\n  - job_name: x\n    scrape_interval: soon\n",
    )?;
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(&bad)
        .output()?;
    assert!(!out.status.success(), "promtool rejects a broken config");
    Ok(())
}

/// Every PromQL expression of every dashboard panel, by dashboard and panel title.
fn dashboard_queries() -> Result<BTreeMap<(String, String), Vec<String>>> {
    let mut out = BTreeMap::new();
    let dir = repo_root().join("dashboards");
    let mut uids = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let board = d["title"].as_str().unwrap_or_default().to_string();
        uids.push(d["uid"].as_str().context("dashboard uid")?.to_string());
        let mut panels: Vec<Value> = d["panels"].as_array().cloned().unwrap_or_default();
        while let Some(p) = panels.pop() {
            if let Some(inner) = p["panels"].as_array() {
                panels.extend(inner.iter().cloned());
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(
                    t["datasource"]["uid"], "prometheus",
                    "{board}: datasource uid matches the provisioning"
                );
                let expr = t["expr"].as_str().context("target expr")?;
                out.entry((
                    board.clone(),
                    p["title"].as_str().unwrap_or_default().to_string(),
                ))
                .or_insert_with(Vec::new)
                .push(expr.replace("$__rate_interval", "10s"));
            }
        }
    }
    let mut sorted = uids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), uids.len(), "dashboard uids are unique");
    assert!(uids.len() >= 2);
    Ok(out)
}

async fn query(prom: &str, expr: &str) -> Option<usize> {
    let v: Value = reqwest::Client::new()
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    (v["status"] == "success").then(|| v["data"]["result"].as_array().map_or(0, Vec::len))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_panel_has_data_from_a_real_prometheus() -> Result<()> {
    let queries = dashboard_queries()?;
    for (name, _) in NO_DATA_YET {
        assert!(
            queries.keys().any(|(_, p)| p == name),
            "listed panel {name} exists"
        );
    }
    // Disaggregated (1 prefill + 1 decode worker) so that the prefill and KV transfer
    // panels have data too.
    let c = Cluster::start_disagg(
        1,
        1,
        |_, _| mocker_args(&[]),
        &["--router-mode", "kv"],
        Duration::from_secs(30),
    )
    .await?;

    // Prometheus with the project's config, rewritten by scripts/observe.sh to this stack.
    let prom_port = free_port()?;
    let workers: Vec<String> = c.systems.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let etcd = c.stack.etcd.url().trim_start_matches("http://").to_string();
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/observe.sh"))
        .env("FRONTEND", format!("127.0.0.1:{}", c.http))
        .env("WORKERS", workers.join(" "))
        .env("ETCD", &etcd)
        .env("PROM_PORT", prom_port.to_string())
        .env("SCRAPE_INTERVAL", "1s");
    let _prometheus = Proc::spawn("prometheus", &mut cmd, c.stack.dir.path())?;
    let prom = format!("http://127.0.0.1:{prom_port}");
    wait_for(Duration::from_secs(30), "prometheus ready", || {
        let url = format!("{prom}/-/ready");
        async move {
            let r = reqwest::get(url).await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await?;

    // Load in the background: streamed chat completions, so every latency histogram moves.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (url, stop) = (c.url("/v1/chat/completions"), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut i = 0u32;
            while !stop.is_cancelled() {
                i += 1;
                let body = serde_json::json!({
                    "model": BUNDLED_MODEL_NAME,
                    "messages": [{"role": "user", "content": format!("Question number {i}: tell me about rivers and bridges, please.")}],
                    "max_tokens": 8,
                    "stream": true,
                });
                if let Ok(r) = client.post(&url).json(&body).send().await {
                    let _ = r.bytes().await;
                }
            }
        })
    };

    let expected_empty: BTreeMap<&str, &str> = NO_DATA_YET.iter().copied().collect();
    let result = wait_for(Duration::from_secs(90), "every panel to have data", || {
        let (queries, prom, expected_empty) = (&queries, &prom, &expected_empty);
        async move {
            for ((_, panel), exprs) in queries {
                if expected_empty.contains_key(panel.as_str()) {
                    continue;
                }
                for e in exprs {
                    if query(prom, e).await.unwrap_or(0) == 0 {
                        return None;
                    }
                }
            }
            Some(())
        }
    })
    .await;
    stop.cancel();
    let _ = load.await;
    if result.is_err() {
        let mut empty = Vec::new();
        for ((board, panel), exprs) in &queries {
            for e in exprs {
                if !expected_empty.contains_key(panel.as_str())
                    && query(&prom, e).await.unwrap_or(0) == 0
                {
                    empty.push(format!("{board} / {panel}: {e}"));
                }
            }
        }
        anyhow::bail!("panels without data: {empty:#?}");
    }
    // The panels listed as waiting really have no data (so the list stays honest).
    for ((_, panel), exprs) in &queries {
        if let Some(reason) = expected_empty.get(panel.as_str()) {
            let n = query(&prom, &exprs[0]).await.unwrap_or(0);
            assert_eq!(
                n, 0,
                "{panel} has data now; drop it from NO_DATA_YET ({reason})"
            );
        }
    }
    Ok(())
}
