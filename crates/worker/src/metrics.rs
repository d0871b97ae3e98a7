//! The engine's statistics on the worker's system status server, refreshed at every scrape:
//! - `dynamo_component_kvstats_{active_blocks, total_blocks, gpu_cache_usage_percent,
//!   gpu_prefix_cache_hit_rate}` (Dynamo's names and labels);
//! - vLLM's engine series that Dynamo's vLLM workers show beside them and dashboards use:
//!   `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:prompt_tokens_total`,
//!   `vllm:generation_tokens_total`, `vllm:num_preemptions_total` (labels `engine`, `model_name`;
//!   counts are per sequence, so a request with `n` choices counts `n`).

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::sync::Arc;
use tandem_engine_api::Engine;
use tandem_runtime::{DistributedRuntime, EndpointId};

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> Option<C> {
    match r.register(Box::new(c.clone())) {
        Ok(()) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "engine metric not registered");
            None
        }
    }
}

struct Kvstats {
    active: prometheus::Gauge,
    total: prometheus::Gauge,
    usage: prometheus::Gauge,
    hit: prometheus::Gauge,
}

fn kvstats(r: &Registry, ep: &EndpointId, worker_id: &str) -> Option<Kvstats> {
    let labels = ["dynamo_namespace", "dynamo_component", "worker_id"];
    let values = [ep.namespace.as_str(), ep.component.as_str(), worker_id];
    let make = |name: &str, help: &str| {
        let vec = register(r, GaugeVec::new(Opts::new(name, help), &labels).ok()?)?;
        Some(vec.with_label_values(&values))
    };
    Some(Kvstats {
        active: make(
            "dynamo_component_kvstats_active_blocks",
            "Number of active KV cache blocks",
        )?,
        total: make(
            "dynamo_component_kvstats_total_blocks",
            "Total number of KV cache blocks",
        )?,
        usage: make(
            "dynamo_component_kvstats_gpu_cache_usage_percent",
            "KV cache usage as a fraction of total blocks (0.0-1.0)",
        )?,
        hit: make(
            "dynamo_component_kvstats_gpu_prefix_cache_hit_rate",
            "Prefix cache hit rate of recent requests (0.0-1.0)",
        )?,
    })
}

struct VllmSeries {
    running: IntGauge,
    waiting: IntGauge,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    preemptions: IntCounter,
}

fn vllm_series(r: &Registry, model: &str) -> Option<VllmSeries> {
    let labels = ["engine", "model_name"];
    let values = ["0", model];
    let gauge = |name: &str, help: &str| {
        let vec = register(r, IntGaugeVec::new(Opts::new(name, help), &labels).ok()?)?;
        Some(vec.with_label_values(&values))
    };
    let counter = |name: &str, help: &str| {
        let vec = register(r, IntCounterVec::new(Opts::new(name, help), &labels).ok()?)?;
        Some(vec.with_label_values(&values))
    };
    Some(VllmSeries {
        running: gauge(
            "vllm:num_requests_running",
            "Sequences in the running batch",
        )?,
        waiting: gauge(
            "vllm:num_requests_waiting",
            "Sequences waiting to be admitted",
        )?,
        prompt_tokens: counter(
            "vllm:prompt_tokens_total",
            "Prompt tokens computed (prefix-cache hits excluded, recomputation included)",
        )?,
        generation_tokens: counter("vllm:generation_tokens_total", "Tokens generated")?,
        preemptions: counter("vllm:num_preemptions_total", "Sequences preempted")?,
    })
}

/// Raises a counter to the engine's cumulative value.
fn catch_up(c: &IntCounter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

/// Registers the series and the scrape hook that refreshes them from `engine`.
pub fn register_engine_metrics(
    drt: &DistributedRuntime,
    ep: &EndpointId,
    model: &str,
    engine: Arc<dyn Engine>,
) {
    let metrics = drt.metrics();
    let r = metrics.registry();
    let (Some(kv), Some(v)) = (kvstats(r, ep, metrics.worker_id()), vllm_series(r, model)) else {
        tracing::error!("engine metrics could not be registered");
        return;
    };
    metrics.add_scrape_hook(Box::new(move || {
        let s = engine.stats();
        kv.active.set(s.active_blocks as f64);
        kv.total.set(s.total_blocks as f64);
        kv.usage.set(if s.total_blocks > 0 {
            s.active_blocks as f64 / s.total_blocks as f64
        } else {
            0.0
        });
        kv.hit.set(s.prefix_hit_rate);
        v.running.set(s.running as i64);
        v.waiting.set(s.waiting as i64);
        catch_up(&v.prompt_tokens, s.prefill_tokens);
        catch_up(&v.generation_tokens, s.generated_tokens);
        catch_up(&v.preemptions, s.preemptions);
    }));
}
