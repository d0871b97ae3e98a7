//! The engine's statistics on the worker's system status server, refreshed at every scrape:
//! - `dynamo_component_kvstats_{active_blocks, total_blocks, gpu_cache_usage_percent,
//!   gpu_prefix_cache_hit_rate}` (Dynamo's names and labels);
//! - vLLM's engine series that Dynamo's vLLM workers show beside them and dashboards use:
//!   `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:prompt_tokens_total`,
//!   `vllm:generation_tokens_total`, `vllm:num_preemptions_total` (labels `engine`, `model_name`;
//!   counts are per sequence, so a request with `n` choices counts `n`);
//! - `tandem_engine_*`: the same counts under tandem's own names (labelled like Dynamo's
//!   component series), prefix-cache queries and hits in tokens, blocks imported from and
//!   held for other workers, and the histogram of tokens per engine step;
//! - [`TransferMetrics`]: KV blocks moved between workers, updated by the data plane.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::sync::Arc;
use std::time::Duration;
use tandem_engine_api::{Engine, STEP_TOKEN_BUCKETS};
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

/// Registers integer series that all carry the same label values.
struct Labelled<'a> {
    r: &'a Registry,
    labels: &'a [&'a str],
    values: &'a [&'a str],
}

impl Labelled<'_> {
    fn gauge(&self, name: &str, help: &str) -> Option<IntGauge> {
        let vec = IntGaugeVec::new(Opts::new(name, help), self.labels).ok()?;
        Some(register(self.r, vec)?.with_label_values(self.values))
    }

    fn counter(&self, name: &str, help: &str) -> Option<IntCounter> {
        let vec = IntCounterVec::new(Opts::new(name, help), self.labels).ok()?;
        Some(register(self.r, vec)?.with_label_values(self.values))
    }
}

fn vllm_series(r: &Registry, model: &str) -> Option<VllmSeries> {
    let l = Labelled {
        r,
        labels: &["engine", "model_name"],
        values: &["0", model],
    };
    Some(VllmSeries {
        running: l.gauge(
            "vllm:num_requests_running",
            "Sequences in the running batch",
        )?,
        waiting: l.gauge(
            "vllm:num_requests_waiting",
            "Sequences waiting to be admitted",
        )?,
        prompt_tokens: l.counter(
            "vllm:prompt_tokens_total",
            "Prompt tokens computed (prefix-cache hits excluded, recomputation included)",
        )?,
        generation_tokens: l.counter("vllm:generation_tokens_total", "Tokens generated")?,
        preemptions: l.counter("vllm:num_preemptions_total", "Sequences preempted")?,
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
    let (Some(kv), Some(v), Some(t)) = (
        kvstats(r, ep, metrics.worker_id()),
        vllm_series(r, model),
        engine_series(r, ep, model),
    ) else {
        tracing::error!("engine metrics could not be registered");
        return;
    };
    step_tokens(r, ep, model, engine.clone());
    metrics.add_scrape_hook(Box::new(move || {
        let s = engine.stats();
        t.running.set(s.running as i64);
        t.waiting.set(s.waiting as i64);
        t.held_blocks.set(s.held_blocks as i64);
        catch_up(&t.prompt_tokens, s.prefill_tokens);
        catch_up(&t.generation_tokens, s.generated_tokens);
        catch_up(&t.preemptions, s.preemptions);
        catch_up(&t.prefix_queries, s.queried_prompt_tokens);
        catch_up(&t.prefix_hits, s.cached_prompt_tokens);
        catch_up(&t.imported_blocks, s.imported_blocks);
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

/// `tandem_engine_*`: the engine's own series, the way Dynamo passes `vllm:*` through, plus
/// the prefix-cache and step-size figures vLLM has and the KV transfer left out.
struct EngineSeries {
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    running: IntGauge,
    waiting: IntGauge,
    preemptions: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    imported_blocks: IntCounter,
    held_blocks: IntGauge,
}

fn engine_series(r: &Registry, ep: &EndpointId, model: &str) -> Option<EngineSeries> {
    let l = Labelled {
        r,
        labels: &["dynamo_namespace", "dynamo_component", "model"],
        values: &[ep.namespace.as_str(), ep.component.as_str(), model],
    };
    Some(EngineSeries {
        prompt_tokens: l.counter(
            "tandem_engine_prompt_tokens_total",
            "Prompt tokens this worker's forward passes computed (not cached, not received)",
        )?,
        generation_tokens: l
            .counter("tandem_engine_generation_tokens_total", "Tokens generated")?,
        running: l.gauge(
            "tandem_engine_num_requests_running",
            "Sequences in the running batch",
        )?,
        waiting: l.gauge(
            "tandem_engine_num_requests_waiting",
            "Sequences waiting to be admitted",
        )?,
        preemptions: l.counter("tandem_engine_preemptions_total", "Sequences preempted")?,
        prefix_queries: l.counter(
            "tandem_engine_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache",
        )?,
        prefix_hits: l.counter(
            "tandem_engine_prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache",
        )?,
        imported_blocks: l.counter(
            "tandem_engine_imported_blocks_total",
            "Prompt blocks written from other workers' KV transfers",
        )?,
        held_blocks: l.gauge(
            "tandem_engine_held_blocks",
            "Blocks held for decode workers to fetch",
        )?,
    })
}

/// `tandem_engine_iteration_tokens`: tokens computed per engine step, a histogram the engine
/// keeps itself (it counts every step; the scrape only reads it).
struct StepTokens {
    desc: prometheus::core::Desc,
    labels: Vec<(String, String)>,
    engine: Arc<dyn Engine>,
}

impl prometheus::core::Collector for StepTokens {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto;
        let h = self.engine.stats().step_tokens;
        let mut hist = proto::Histogram::default();
        hist.set_sample_count(h.count);
        hist.set_sample_sum(h.sum as f64);
        hist.set_bucket(
            STEP_TOKEN_BUCKETS
                .iter()
                .zip(&h.buckets)
                .map(|(&le, &n)| {
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(le as f64);
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        let mut m = proto::Metric::default();
        m.set_label(
            self.labels
                .iter()
                .map(|(k, v)| {
                    let mut l = proto::LabelPair::default();
                    l.set_name(k.clone());
                    l.set_value(v.clone());
                    l
                })
                .collect(),
        );
        m.set_histogram(hist);
        let mut mf = proto::MetricFamily::default();
        mf.set_name(self.desc.fq_name.clone());
        mf.set_help(self.desc.help.clone());
        mf.set_field_type(proto::MetricType::HISTOGRAM);
        mf.mut_metric().push(m);
        vec![mf]
    }
}

fn step_tokens(r: &Registry, ep: &EndpointId, model: &str, engine: Arc<dyn Engine>) {
    let labels = vec![
        ("dynamo_component".to_string(), ep.component.clone()),
        ("dynamo_namespace".to_string(), ep.namespace.clone()),
        ("model".to_string(), model.to_string()),
    ];
    let desc = prometheus::core::Desc::new(
        "tandem_engine_iteration_tokens".into(),
        "Tokens computed per engine step (prompt and generated)".into(),
        labels.iter().map(|(k, _)| k.clone()).collect(),
        Default::default(),
    );
    match desc {
        Ok(desc) => {
            if let Err(e) = r.register(Box::new(StepTokens {
                desc,
                labels,
                engine,
            })) {
                tracing::error!(error = %e, "step histogram not registered");
            }
        }
        Err(e) => tracing::error!(error = %e, "step histogram not described"),
    }
}

/// The worker's KV transfer series (Dynamo has none first-party; names in its style):
/// `dynamo_component_kv_transfer_{bytes_total,blocks_total}{direction}`,
/// `dynamo_component_kv_transfer_duration_seconds{direction}` and
/// `dynamo_component_kv_transfer_failures_total{reason}`. Usable unregistered (in tests).
#[derive(Clone)]
pub struct TransferMetrics {
    bytes: IntCounterVec,
    blocks: IntCounterVec,
    duration: HistogramVec,
    failures: IntCounterVec,
    base: [String; 2],
}

impl TransferMetrics {
    pub fn new(ep: &EndpointId) -> prometheus::Result<Self> {
        let labels = |extra: &'static str| ["dynamo_namespace", "dynamo_component", extra];
        let counter = |name: &str, help: &str, extra| {
            IntCounterVec::new(Opts::new(name, help), &labels(extra))
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "dynamo_component_kv_transfer_duration_seconds",
                "Time to move one transfer's KV blocks, from connect to the last byte",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &labels("direction"),
        )?;
        Ok(Self {
            bytes: counter(
                "dynamo_component_kv_transfer_bytes_total",
                "KV cache bytes moved between workers",
                "direction",
            )?,
            blocks: counter(
                "dynamo_component_kv_transfer_blocks_total",
                "KV cache blocks moved between workers",
                "direction",
            )?,
            duration,
            failures: counter(
                "dynamo_component_kv_transfer_failures_total",
                "KV transfers that failed, by reason",
                "reason",
            )?,
            base: [ep.namespace.clone(), ep.component.clone()],
        })
    }

    /// Registers the series with the worker's registry (and pre-creates both directions so
    /// the rate is 0 rather than absent before the first transfer).
    pub fn register(&self, r: &Registry) {
        register(r, self.bytes.clone());
        register(r, self.blocks.clone());
        register(r, self.duration.clone());
        register(r, self.failures.clone());
        for d in ["sent", "received"] {
            self.bytes.with_label_values(&self.labels(d));
            self.blocks.with_label_values(&self.labels(d));
        }
    }

    fn labels<'a>(&'a self, v: &'a str) -> [&'a str; 3] {
        [&self.base[0], &self.base[1], v]
    }

    fn moved(&self, direction: &str, bytes: u64, blocks: u64, took: Duration) {
        let l = self.labels(direction);
        self.bytes.with_label_values(&l).inc_by(bytes);
        self.blocks.with_label_values(&l).inc_by(blocks);
        self.duration
            .with_label_values(&l)
            .observe(took.as_secs_f64());
    }

    pub fn sent(&self, bytes: u64, blocks: u64, took: Duration) {
        self.moved("sent", bytes, blocks, took);
    }

    pub fn received(&self, bytes: u64, blocks: u64, took: Duration) {
        self.moved("received", bytes, blocks, took);
    }

    pub fn failed(&self, reason: &str) {
        self.failures.with_label_values(&self.labels(reason)).inc();
    }

    /// Failures counted so far for `reason` (tests and logs).
    pub fn failures(&self, reason: &str) -> u64 {
        self.failures.with_label_values(&self.labels(reason)).get()
    }
}
