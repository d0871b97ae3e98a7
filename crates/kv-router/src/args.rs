//! The KV router's command-line flags (Dynamo's names and environment variables), checked
//! when parsed.

use crate::intake::EventSource;
use crate::router::{CostModel, KvRouterConfig};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct KvRouterArgs {
    /// Weight of prefill blocks against decode blocks in the cost (0 ignores cache overlap).
    #[arg(
        long = "kv-overlap-score-weight",
        alias = "router-kv-overlap-score-weight",
        env = "DYN_KV_OVERLAP_SCORE_WEIGHT",
        default_value_t = 1.0,
        value_parser = non_negative
    )]
    pub overlap_score_weight: f64,
    /// 0 picks the cheapest worker; above 0 samples workers by softmax over their costs.
    #[arg(
        long = "router-temperature",
        env = "DYN_ROUTER_TEMPERATURE",
        default_value_t = 0.0,
        value_parser = non_negative
    )]
    pub temperature: f64,
    /// Block size the router hashes with (default: the model card's).
    #[arg(
        long = "kv-cache-block-size",
        env = "DYN_KV_CACHE_BLOCK_SIZE",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub block_size: Option<u32>,
    /// Approximate mode: ignore workers' KV events and assume a worker caches what it was
    /// sent, for `--router-ttl-secs`.
    #[arg(long = "no-kv-events")]
    pub no_kv_events: bool,
    #[arg(long = "router-ttl-secs", default_value_t = 120.0, value_parser = non_negative)]
    pub ttl_secs: f64,
    /// Skip workers whose routed blocks exceed this fraction of their KV cache (0–1) while
    /// a less busy one exists.
    #[arg(long = "busy-threshold", env = "DYN_BUSY_THRESHOLD", value_parser = fraction)]
    pub busy_threshold: Option<f64>,
    /// Where to read KV events: `nats` (Dynamo's JSON events) or `zmq` (each worker's
    /// advertised `--kv-events-config` socket, vLLM's format).
    #[arg(
        long = "kv-events-source",
        env = "DYN_KV_EVENTS_SOURCE",
        default_value = "nats"
    )]
    pub source: EventSource,
    /// How the KV router counts a worker's cost: `work` counts blocks in flight at a quarter
    /// and adds to Dynamo's formula the delay a prefill puts on the requests already on that
    /// worker and the cached blocks it would evict; `dynamo` is Dynamo's formula alone.
    #[arg(long = "router-cost-model", default_value = "work")]
    pub cost_model: CostModel,
}

impl KvRouterArgs {
    pub fn config(&self) -> KvRouterConfig {
        KvRouterConfig {
            overlap_score_weight: self.overlap_score_weight,
            temperature: self.temperature,
            use_kv_events: !self.no_kv_events,
            approx_ttl: Duration::from_secs_f64(self.ttl_secs),
            busy_threshold: self.busy_threshold,
            cost_model: self.cost_model,
        }
    }
}

/// A number in [0, 1e9] (weights, temperatures and seconds; `Duration` cannot hold 1e300 s).
fn non_negative(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1e9).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not in [0, 1e9]")),
        Err(e) => Err(e.to_string()),
    }
}

/// A number in [0, 1].
fn fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not in [0, 1]")),
        Err(e) => Err(e.to_string()),
    }
}
