//! `scripts/bench.sh` in its tiny configuration, so that the suite users run cannot rot: aiperf
//! (installed by the script from PyPI) against tandem's stack and against Dynamo 1.6.1's
//! (`--peer dynamo`, also installed by the script), both workloads, the summary table with a
//! ratio per row and the plots. Likewise `scripts/bench-router.sh --tiny` (tandem's side: the
//! KV router and round-robin over four mockers, with Dynamo's token timing). Ports are free
//! ones; binaries the debug build's.

use anyhow::Result;
use std::path::Path;
use std::process::Command;
use tandem_tests::{free_port, repo_root};

/// A free port below 32768: Dynamo 1.6.1 reads `DYN_SYSTEM_PORT` as a signed 16-bit number.
fn free_low_port() -> Result<u16> {
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    (start..32_000)
        .chain(20_000..start)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .ok_or_else(|| anyhow::anyhow!("no free port below 32768"))
}

/// `bash SCRIPT ARGS --out OUT` from the repository root on the debug build, with free ports
/// for NATS, etcd (client and peer) and the frontend's HTTP.
fn bench_script(script: &str, args: &[&str], out: &Path) -> Result<Command> {
    let mut cmd = Command::new("bash");
    cmd.current_dir(repo_root())
        .arg(script)
        .args(args)
        .arg("--out")
        .arg(out)
        .env("TANDEM_TARGET", "debug");
    for var in ["NATS_PORT", "ETCD_PORT", "ETCD_PEER_PORT", "HTTP_PORT"] {
        cmd.env(var, free_port()?.to_string());
    }
    Ok(cmd)
}

#[test]
fn the_aiperf_suite_runs_tiny_against_tandem_and_dynamo() -> Result<()> {
    let out = tempfile::tempdir()?;
    let status = bench_script(
        "scripts/bench.sh",
        &["--tiny", "--peer", "dynamo"],
        out.path(),
    )?
    .env("SYSTEM_PORT", free_low_port()?.to_string())
    .status()?;
    assert!(status.success(), "scripts/bench.sh --tiny failed");
    let summary = std::fs::read_to_string(out.path().join("summary.md"))?;
    for workload in ["synthetic", "shared-prefix"] {
        let row = summary
            .lines()
            .find(|l| l.starts_with(&format!("| mocker | {workload} | 2 |")))
            .unwrap_or_else(|| panic!("no {workload} row in:\n{summary}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // req/s of each side, and their ratio, are numbers.
        for cell in &cells[4..7] {
            let n: f64 = cell.trim_end_matches('×').replace(',', "").parse()?;
            assert!(n > 0.0, "{row}");
        }
        let png = std::fs::read(out.path().join(format!("mocker-{workload}.png")))?;
        assert_eq!(&png[..4], b"\x89PNG", "mocker-{workload}.png is a PNG");
    }
    Ok(())
}

#[test]
fn the_router_benchmark_runs_tiny_with_both_routers() -> Result<()> {
    let out = tempfile::tempdir()?;
    let args = ["--tiny", "--regimes", "partial"];
    let status = bench_script("scripts/bench-router.sh", &args, out.path())?
        .env("TOKEN_TIMING", "after-prefill")
        .env("BENCH_ROUTER_LOGS", out.path().join("logs"))
        .status()?;
    assert!(status.success(), "scripts/bench-router.sh --tiny failed");
    for router in ["kv", "round-robin"] {
        let raw =
            std::fs::read_to_string(out.path().join(format!("raw/partial-tandem-{router}.json")))?;
        let r: serde_json::Value = serde_json::from_str(&raw)?;
        assert_eq!(r["requests"], 32, "{raw}");
        assert_eq!(r["errors"], 0, "{raw}");
        let hit = r["prefix_hit_rate"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&hit), "{raw}");
        assert!(
            r["ttft_ms"]["p50"].as_f64().is_some_and(|t| t > 0.0),
            "{raw}"
        );
    }
    // Second turns find their first turn's prompt on the worker kv routed it to.
    let kv: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.path().join("raw/partial-tandem-kv.json"),
    )?)?;
    assert!(kv["prefix_hit_rate"].as_f64().unwrap_or(0.0) > 0.3, "{kv}");
    let summary = std::fs::read_to_string(out.path().join("summary.md"))?;
    assert!(summary.contains("| partial | tandem | kv |"), "{summary}");
    assert!(
        summary.contains("--token-timing after-prefill"),
        "{summary}"
    );
    Ok(())
}
