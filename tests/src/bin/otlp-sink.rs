//! A minimal OTLP/gRPC trace receiver for benchmarks and manual checks: accepts spans on the
//! given address and prints how many it holds once a second, by span name.
//!
//! `otlp-sink 127.0.0.1:4317`

use std::collections::BTreeMap;
use std::time::Duration;
use tandem_tests::otlp::Collector;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".to_string());
    let collector = Collector::start_on(&addr).await?;
    println!("otlp-sink listening on {addr}");
    let mut last = usize::MAX;
    loop {
        tokio::select! {
            _ = tandem_runtime::shutdown_signal() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let spans = collector.spans();
        if spans.len() != last {
            last = spans.len();
            let mut by_name = BTreeMap::new();
            for s in &spans {
                *by_name
                    .entry(format!("{}/{}", s.service, s.name))
                    .or_insert(0usize) += 1;
            }
            println!("{} spans: {by_name:?}", spans.len());
        }
    }
    Ok(())
}
