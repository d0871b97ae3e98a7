//! The router's Prometheus metrics, registered on the frontend's registry.
//!
//! - `dynamo_component_kv_cache_events_applied{event_type,status}` (Dynamo's name and labels);
//! - `dynamo_component_kv_router_resyncs_total{reason}`: gap / restart / joined;
//! - `dynamo_component_router_kv_hit_rate`: matched blocks / prompt blocks of each decision;
//! - `dynamo_router_overhead_total_ms`-style decision latency as
//!   `dynamo_component_kv_router_decision_seconds`;
//! - per worker: `dynamo_frontend_worker_active_prefill_tokens`,
//!   `dynamo_frontend_worker_active_decode_blocks`, `dynamo_component_kv_router_tree_blocks`.

use crate::sequences::ActiveSequences;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};
use std::sync::{Arc, Mutex, Weak};

#[derive(Clone)]
pub struct RouterMetrics {
    events: IntCounterVec,
    resyncs: IntCounterVec,
    pub hit_rate: Histogram,
    pub decision_seconds: Histogram,
    loads: LoadCollector,
    tree: IntGaugeVec,
}

/// Per-worker routed load, read from the routers' active sequences when scraped (a gauge set
/// only when routing would go stale once requests finish).
#[derive(Clone)]
struct LoadCollector {
    prefill_tokens: IntGaugeVec,
    decode_blocks: IntGaugeVec,
    sources: Arc<Mutex<Vec<Weak<ActiveSequences>>>>,
}

impl Collector for LoadCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.prefill_tokens.desc();
        d.extend(self.decode_blocks.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.prefill_tokens.reset();
        self.decode_blocks.reset();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.retain(|s| s.strong_count() > 0);
        for s in sources.iter().filter_map(Weak::upgrade) {
            for (worker, l) in s.all() {
                let id = worker.to_string();
                self.prefill_tokens
                    .with_label_values(&[&id])
                    .set(l.prefill_tokens as i64);
                self.decode_blocks
                    .with_label_values(&[&id])
                    .set(l.decode_blocks as i64);
            }
        }
        let mut out = self.prefill_tokens.collect();
        out.extend(self.decode_blocks.collect());
        out
    }
}

impl RouterMetrics {
    /// Creates the metrics and registers them on `registry`; a second model's router shares
    /// the families already registered (they are the same names).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        for c in [
            Box::new(m.events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.resyncs.clone()),
            Box::new(m.hit_rate.clone()),
            Box::new(m.decision_seconds.clone()),
            Box::new(m.loads.clone()),
            Box::new(m.tree.clone()),
        ] {
            match registry.register(c) {
                Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(m)
    }

    /// Metrics nobody scrapes (tests, benches).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        let gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["worker_id"]);
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        Ok(Self {
            events: IntCounterVec::new(
                Opts::new(
                    "dynamo_component_kv_cache_events_applied",
                    "KV cache events applied to the router's index",
                ),
                &["event_type", "status"],
            )?,
            resyncs: IntCounterVec::new(
                Opts::new(
                    "dynamo_component_kv_router_resyncs_total",
                    "Times the router refetched a worker's KV state (event gap, restart, joined mid-stream)",
                ),
                &["reason"],
            )?,
            hit_rate: hist(
                "dynamo_component_router_kv_hit_rate",
                "Fraction of the prompt's blocks cached on the chosen worker",
                vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            )?,
            decision_seconds: hist(
                "dynamo_component_kv_router_decision_seconds",
                "Time to choose a worker (hashing, index lookup, cost)",
                vec![
                    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
                ],
            )?,
            loads: LoadCollector {
                prefill_tokens: gauge(
                    "dynamo_frontend_worker_active_prefill_tokens",
                    "Prompt tokens routed to the worker and not yet prefilled",
                )?,
                decode_blocks: gauge(
                    "dynamo_frontend_worker_active_decode_blocks",
                    "KV blocks of requests routed to the worker and still running",
                )?,
                sources: Arc::default(),
            },
            tree: gauge(
                "dynamo_component_kv_router_tree_blocks",
                "Blocks the router's index holds for the worker",
            )?,
        })
    }

    pub fn event_applied(&self, event_type: &str, status: &str) {
        self.events.with_label_values(&[event_type, status]).inc();
    }

    pub fn resync(&self, reason: &str) {
        self.resyncs.with_label_values(&[reason]).inc();
    }

    pub fn tree_size(&self, worker_id: u64, blocks: usize) {
        self.tree
            .with_label_values(&[&worker_id.to_string()])
            .set(blocks as i64);
    }

    pub(crate) fn watch_loads(&self, active: Weak<ActiveSequences>) {
        self.loads
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(active);
    }

    pub fn forget_worker(&self, worker_id: u64) {
        let id = worker_id.to_string();
        let _ = self.tree.remove_label_values(&[&id]);
    }
}
