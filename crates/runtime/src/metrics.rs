//! Dynamo's `dynamo_component_*` metrics for work handlers, plus NATS client gauges.
//!
//! One [`RuntimeMetrics`] per process owns the Prometheus registry everything else registers
//! into. Each served endpoint gets [`EndpointMetrics`]: the same families bound to its
//! `dynamo_namespace`, `dynamo_component`, `dynamo_endpoint` and `worker_id` labels.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::Instant;

const ENDPOINT_LABELS: [&str; 4] = [
    "dynamo_namespace",
    "dynamo_component",
    "dynamo_endpoint",
    "worker_id",
];

/// Classic Dynamo's request-duration buckets (Prometheus' defaults).
pub const REQUEST_DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Error kinds counted in `dynamo_component_errors_total{error_type}`.
pub mod error_type {
    pub const DESERIALIZATION: &str = "deserialization";
    pub const INVALID_MESSAGE: &str = "invalid_message";
    pub const RESPONSE_STREAM: &str = "response_stream";
    pub const GENERATE: &str = "generate";
    pub const PUBLISH_RESPONSE: &str = "publish_response";
    pub const PUBLISH_FINAL: &str = "publish_final";
}

/// Called before each scrape so gauges that mirror another component's state are fresh.
pub type ScrapeHook = Box<dyn Fn() + Send + Sync>;

pub struct RuntimeMetrics {
    registry: Registry,
    hooks: std::sync::Mutex<Vec<ScrapeHook>>,
    worker_id: String,
    started: Instant,
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    inflight: IntGaugeVec,
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    errors: IntCounterVec,
    cancellations: IntCounterVec,
    uptime: prometheus::Gauge,
    nats: NatsGauges,
}

struct NatsGauges {
    connection_state: IntGauge,
    in_bytes: IntGauge,
    out_bytes: IntGauge,
    in_messages: IntGauge,
    out_messages: IntGauge,
    connects: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    register(registry, Box::new(c.clone()));
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help)
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    register(registry, Box::new(g.clone()));
    g
}

fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>) {
    // Names are static and registered once per registry, so a clash is a programming error
    // that tests catch; a running process keeps serving without the metric.
    if let Err(e) = registry.register(c) {
        tracing::error!(error = %e, "metric registration failed");
    }
}

impl RuntimeMetrics {
    pub fn new(worker_id: u64) -> Self {
        let registry = Registry::new();
        let r = &registry;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "dynamo_component_request_duration_seconds",
                "Time spent processing requests by work handler",
            )
            .buckets(REQUEST_DURATION_BUCKETS.to_vec()),
            &ENDPOINT_LABELS,
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(r, Box::new(request_duration.clone()));
        let inflight = IntGaugeVec::new(
            Opts::new(
                "dynamo_component_inflight_requests",
                "Number of requests currently being processed by work handler",
            ),
            &ENDPOINT_LABELS,
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(r, Box::new(inflight.clone()));
        let mut error_labels = ENDPOINT_LABELS.to_vec();
        error_labels.push("error_type");
        let uptime = prometheus::Gauge::with_opts(
            Opts::new(
                "dynamo_component_uptime_seconds",
                "Total uptime of the DistributedRuntime in seconds",
            )
            .const_label("worker_id", worker_id.to_string()),
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        register(r, Box::new(uptime.clone()));
        Self {
            requests_total: counter(
                r,
                "dynamo_component_requests_total",
                "Total number of requests processed by work handler",
                &ENDPOINT_LABELS,
            ),
            request_bytes: counter(
                r,
                "dynamo_component_request_bytes_total",
                "Total number of bytes received in requests by work handler",
                &ENDPOINT_LABELS,
            ),
            response_bytes: counter(
                r,
                "dynamo_component_response_bytes_total",
                "Total number of bytes sent in responses by work handler",
                &ENDPOINT_LABELS,
            ),
            errors: counter(
                r,
                "dynamo_component_errors_total",
                "Total number of errors in work handler processing",
                &error_labels,
            ),
            cancellations: counter(
                r,
                "dynamo_component_cancellation_total",
                "Total number of requests cancelled by work handler",
                &ENDPOINT_LABELS,
            ),
            nats: NatsGauges {
                connection_state: gauge(
                    r,
                    "dynamo_component_nats_client_connection_state",
                    "NATS connection state (0=disconnected, 1=connected, 2=reconnecting)",
                ),
                in_bytes: gauge(
                    r,
                    "dynamo_component_nats_client_in_bytes",
                    "Bytes received from NATS",
                ),
                out_bytes: gauge(
                    r,
                    "dynamo_component_nats_client_out_bytes",
                    "Bytes sent to NATS",
                ),
                in_messages: gauge(
                    r,
                    "dynamo_component_nats_client_in_messages",
                    "Messages received from NATS",
                ),
                out_messages: gauge(
                    r,
                    "dynamo_component_nats_client_out_messages",
                    "Messages sent to NATS",
                ),
                connects: gauge(
                    r,
                    "dynamo_component_nats_client_connects",
                    "Times the NATS connection was established (initial connect plus reconnects)",
                ),
            },
            request_duration,
            inflight,
            uptime,
            registry,
            hooks: std::sync::Mutex::new(Vec::new()),
            worker_id: worker_id.to_string(),
            started: Instant::now(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Runs `hook` before every scrape.
    pub fn add_scrape_hook(&self, hook: ScrapeHook) {
        crate::lock(&self.hooks).push(hook);
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn endpoint(&self, namespace: &str, component: &str, endpoint: &str) -> EndpointMetrics {
        let labels = [namespace, component, endpoint, self.worker_id.as_str()];
        let bound_errors = |kind: &str| {
            self.errors.with_label_values(&[
                namespace,
                component,
                endpoint,
                self.worker_id.as_str(),
                kind,
            ])
        };
        EndpointMetrics {
            requests: self.requests_total.with_label_values(&labels),
            duration: self.request_duration.with_label_values(&labels),
            inflight: self.inflight.with_label_values(&labels),
            request_bytes: self.request_bytes.with_label_values(&labels),
            response_bytes: self.response_bytes.with_label_values(&labels),
            cancellations: self.cancellations.with_label_values(&labels),
            errors: ErrorCounters {
                deserialization: bound_errors(error_type::DESERIALIZATION),
                invalid_message: bound_errors(error_type::INVALID_MESSAGE),
                response_stream: bound_errors(error_type::RESPONSE_STREAM),
                generate: bound_errors(error_type::GENERATE),
                publish_response: bound_errors(error_type::PUBLISH_RESPONSE),
                publish_final: bound_errors(error_type::PUBLISH_FINAL),
            },
        }
    }

    /// Refreshes scrape-time values and renders the registry in Prometheus text format.
    pub fn render(&self, nats: Option<&async_nats::Client>) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        for hook in crate::lock(&self.hooks).iter() {
            hook();
        }
        if let Some(client) = nats {
            use std::sync::atomic::Ordering::Relaxed;
            let state = match client.connection_state() {
                async_nats::connection::State::Disconnected => 0,
                async_nats::connection::State::Connected => 1,
                async_nats::connection::State::Pending => 2,
            };
            let stats = client.statistics();
            let n = &self.nats;
            n.connection_state.set(state);
            n.in_bytes.set(clamp(stats.in_bytes.load(Relaxed)));
            n.out_bytes.set(clamp(stats.out_bytes.load(Relaxed)));
            n.in_messages.set(clamp(stats.in_messages.load(Relaxed)));
            n.out_messages.set(clamp(stats.out_messages.load(Relaxed)));
            n.connects.set(clamp(stats.connects.load(Relaxed)));
        }
        encode(&self.registry)
    }
}

/// Prometheus text format of everything in `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "failed to encode metrics");
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `errors_total` bound to one endpoint, one counter per error type.
#[derive(Clone)]
pub struct ErrorCounters {
    pub deserialization: IntCounter,
    pub invalid_message: IntCounter,
    pub response_stream: IntCounter,
    pub generate: IntCounter,
    pub publish_response: IntCounter,
    pub publish_final: IntCounter,
}

#[derive(Clone)]
pub struct EndpointMetrics {
    pub requests: IntCounter,
    pub duration: Histogram,
    pub inflight: IntGauge,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    pub cancellations: IntCounter,
    pub errors: ErrorCounters,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_metrics_render_with_dynamo_names_and_labels() {
        let m = RuntimeMetrics::new(0x694d);
        let ep = m.endpoint("dynamo", "backend", "generate");
        ep.requests.inc();
        ep.errors.generate.inc();
        ep.duration.observe(0.02);
        let text = m.render(None);
        assert!(text.contains(
            "dynamo_component_requests_total{dynamo_component=\"backend\",dynamo_endpoint=\"generate\",dynamo_namespace=\"dynamo\",worker_id=\"26957\"} 1"
        ), "{text}");
        assert!(text.contains("error_type=\"generate\""));
        assert!(text.contains("dynamo_component_request_duration_seconds_bucket{dynamo_component=\"backend\",dynamo_endpoint=\"generate\",dynamo_namespace=\"dynamo\",worker_id=\"26957\",le=\"0.025\"} 1"));
        assert!(text.contains("dynamo_component_uptime_seconds{worker_id=\"26957\"}"));
    }
}
