//! `dynamo_frontend_*` metrics with Dynamo's names, labels and log-spaced buckets.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Dynamo's bucket scheme: 0, then `count-1` log-spaced bounds from `min` to `max` rounded to
/// two significant figures, de-duplicated.
pub fn log_buckets(min: f64, max: f64, count: usize) -> Vec<f64> {
    let mut b = vec![0.0];
    let (lo, hi) = (min.ln(), max.ln());
    for i in 1..count {
        let v = (lo + (hi - lo) * (i as f64) / ((count - 1) as f64)).exp();
        let v = round2(v);
        if b.last().is_none_or(|last| *last < v) {
            b.push(v);
        }
    }
    b
}

/// Rounds to two significant figures, returning the double nearest the decimal value (so
/// bounds render as `0.47`, not `0.47000000000000003`).
fn round2(v: f64) -> f64 {
    format!("{v:.1e}").parse().unwrap_or(v)
}

pub struct FrontendMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub inflight: IntGaugeVec,
    pub queued: IntGaugeVec,
    pub disconnected: IntGauge,
    pub duration: HistogramVec,
    pub isl: HistogramVec,
    pub osl: HistogramVec,
    pub output_tokens: IntCounterVec,
    pub ttft: HistogramVec,
    pub itl: HistogramVec,
    /// Requests by how their prompt was computed: `remote_prefill`, `local_prefill`, `fallback`.
    pub prefill_path: IntCounterVec,
    /// The prefill leg, from choosing a prefill worker to its transfer parameters.
    pub prefill_duration: HistogramVec,
    /// Choices moved to another worker, by `migration_type` (`new_request`, `ongoing_request`).
    pub migrations: IntCounterVec,
    /// From a worker's failure to the choice's new stream (or to giving up), by
    /// `migration_type` and `outcome` (`success`, `failure`).
    pub migration_duration: HistogramVec,
    pub model_gauges: Vec<(&'static str, IntGaugeVec)>,
}

fn hist(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["model"])
        .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    let _ = r.register(Box::new(h.clone()));
    h
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    let _ = r.register(Box::new(g.clone()));
    g
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    let _ = r.register(Box::new(c.clone()));
    c
}

impl FrontendMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let p = "dynamo_frontend";
        let disconnected = IntGauge::new(
            format!("{p}_disconnected_clients"),
            "Number of disconnected clients",
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let _ = r.register(Box::new(disconnected.clone()));
        let model_gauges = [
            "total_kv_blocks",
            "max_num_seqs",
            "max_num_batched_tokens",
            "context_length",
            "kv_cache_block_size",
            "migration_limit",
            "workers",
            "prefill_workers",
        ]
        .into_iter()
        .map(|n| {
            (
                n,
                gauge_vec(
                    &r,
                    &format!("{p}_model_{n}"),
                    &format!("Model {n}"),
                    &["model"],
                ),
            )
        })
        .collect();
        Self {
            requests: counter_vec(
                &r,
                &format!("{p}_requests_total"),
                "Total number of LLM requests processed",
                &["model", "endpoint", "request_type", "status", "error_type"],
            ),
            inflight: gauge_vec(
                &r,
                &format!("{p}_inflight_requests"),
                "Number of inflight requests",
                &["model"],
            ),
            queued: gauge_vec(
                &r,
                &format!("{p}_queued_requests"),
                "Number of requests in HTTP processing queue",
                &["model"],
            ),
            duration: hist(
                &r,
                &format!("{p}_request_duration_seconds"),
                "Duration of LLM requests",
                log_buckets(1.0, 512.0, 10),
            ),
            isl: hist(
                &r,
                &format!("{p}_input_sequence_tokens"),
                "Input sequence length in tokens",
                log_buckets(50.0, 128000.0, 12),
            ),
            osl: hist(
                &r,
                &format!("{p}_output_sequence_tokens"),
                "Output sequence length in tokens",
                log_buckets(50.0, 32000.0, 10),
            ),
            output_tokens: counter_vec(
                &r,
                &format!("{p}_output_tokens_total"),
                "Total number of output tokens generated",
                &["model"],
            ),
            ttft: hist(
                &r,
                &format!("{p}_time_to_first_token_seconds"),
                "Time to first token in seconds",
                log_buckets(0.001, 480.0, 18),
            ),
            itl: hist(
                &r,
                &format!("{p}_inter_token_latency_seconds"),
                "Inter-token latency in seconds",
                log_buckets(0.001, 2.0, 13),
            ),
            prefill_path: counter_vec(
                &r,
                &format!("{p}_disaggregated_requests_total"),
                "Requests by prefill path: remote_prefill (on a prefill worker), local_prefill (on the decode worker by choice), fallback (the prefill leg failed)",
                &["model", "path"],
            ),
            prefill_duration: hist(
                &r,
                &format!("{p}_prefill_duration_seconds"),
                "Duration of the remote prefill leg in seconds",
                log_buckets(0.001, 480.0, 18),
            ),
            migrations: counter_vec(
                &r,
                &format!("{p}_model_migration_total"),
                "Requests (choices) moved to another worker after a worker failure",
                &["model", "migration_type"],
            ),
            migration_duration: {
                let name = format!("{p}_model_migration_duration_seconds");
                let h = HistogramVec::new(
                    HistogramOpts::new(name.as_str(), "Time to move a request to another worker")
                        .buckets(vec![
                            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                            60.0,
                        ]),
                    &["model", "migration_type", "outcome"],
                )
                .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
                let _ = r.register(Box::new(h.clone()));
                h
            },
            disconnected,
            model_gauges,
            registry: r,
        }
    }

    pub fn model_gauge(&self, name: &str, model: &str) -> Option<IntGauge> {
        self.model_gauges
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, g)| g.with_label_values(&[model]))
    }
}

impl Default for FrontendMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-request measurements; counts the request exactly once, when dropped.
pub struct RequestGuard<'a> {
    m: &'a FrontendMetrics,
    model: String,
    endpoint: &'static str,
    request_type: &'static str,
    start: std::time::Instant,
    first_token: Option<std::time::Instant>,
    last_token: Option<std::time::Instant>,
    queued: Option<IntGauge>,
    /// Bound once: these two are touched for every streamed chunk.
    itl: Histogram,
    output_counter: prometheus::IntCounter,
    pub output_tokens: u64,
    input_tokens: usize,
    error_type: Option<&'static str>,
    /// The HTTP status the client got (or will see as the stream's error), once settled.
    status: Option<u16>,
    /// Set by `ok` or `fail`; a guard dropped without either is a cancelled request.
    settled: bool,
    /// The request's `http-request` span, which gets the end-of-request fields.
    span: tracing::Span,
}

impl<'a> RequestGuard<'a> {
    /// `span` is the request's `http-request` span.
    pub fn new(
        m: &'a FrontendMetrics,
        model: &str,
        endpoint: &'static str,
        stream: bool,
        span: tracing::Span,
    ) -> Self {
        m.inflight.with_label_values(&[model]).inc();
        let queued = m.queued.with_label_values(&[model]);
        queued.inc();
        Self {
            m,
            model: model.to_string(),
            endpoint,
            request_type: if stream { "stream" } else { "unary" },
            start: std::time::Instant::now(),
            first_token: None,
            last_token: None,
            queued: Some(queued),
            itl: m.itl.with_label_values(&[model]),
            output_counter: m.output_tokens.with_label_values(&[model]),
            output_tokens: 0,
            input_tokens: 0,
            error_type: Some("internal"),
            status: None,
            settled: false,
            span,
        }
    }

    pub fn input_tokens(&mut self, n: usize) {
        self.input_tokens = n;
    }

    /// Records `n` new tokens: TTFT and ISL on the first, ITL per token afterwards.
    pub fn tokens(&mut self, n: usize, isl: usize) {
        if n == 0 {
            return;
        }
        let now = std::time::Instant::now();
        let model = [self.model.as_str()];
        match self.last_token {
            None => {
                self.first_token = Some(now);
                if let Some(q) = self.queued.take() {
                    q.dec();
                }
                self.m
                    .ttft
                    .with_label_values(&model)
                    .observe((now - self.start).as_secs_f64());
                self.m.isl.with_label_values(&model).observe(isl as f64);
            }
            Some(last) => {
                let per = (now - last).as_secs_f64() / n as f64;
                for _ in 0..n {
                    self.itl.observe(per);
                }
            }
        }
        self.last_token = Some(now);
        self.output_tokens += n as u64;
        self.output_counter.inc_by(n as u64);
    }

    pub fn ok(&mut self) {
        self.error_type = None;
        self.status = Some(200);
        self.settled = true;
    }

    pub fn fail(&mut self, e: &crate::error::ApiError) {
        self.error_type = Some(e.metric_error_type());
        self.status = Some(e.status.as_u16());
        self.settled = true;
    }

    /// Dynamo's end-of-request fields on the `http-request` span, and one log line in it.
    fn record_span(&self) {
        let outcome = match (self.settled, self.error_type) {
            (false, _) => "cancelled",
            (true, None) => "success",
            (true, Some(_)) => "error",
        };
        let span = &self.span;
        // The GenAI attributes repeat Dynamo's fields for trace UIs: recorded for an exported
        // trace only.
        let gen_ai = tandem_telemetry::propagation::is_exported(span);
        span.record("input_tokens", self.input_tokens as u64);
        span.record("output_tokens", self.output_tokens);
        if gen_ai {
            span.record("gen_ai.usage.input_tokens", self.input_tokens as u64);
            span.record("gen_ai.usage.output_tokens", self.output_tokens);
        }
        let ttft = self
            .first_token
            .map(|t| ((t - self.start).as_secs_f64() * 1e5).round() / 100.0);
        if let Some(ms) = ttft {
            span.record("ttft_ms", ms);
            if gen_ai {
                span.record("gen_ai.server.time_to_first_token", ms / 1e3);
            }
        }
        if let (Some(first), Some(last)) = (self.first_token, self.last_token)
            && self.output_tokens > 1
        {
            let itl = (last - first).as_secs_f64() * 1e3 / (self.output_tokens - 1) as f64;
            span.record("avg_itl_ms", (itl * 100.0).round() / 100.0);
        }
        span.record("request.outcome", outcome);
        tracing::info!(
            target: crate::trace::REQUEST_LOG,
            parent: span,
            model = %self.model,
            endpoint = self.endpoint,
            request_type = self.request_type,
            status = self.status,
            outcome,
            error_type = self.error_type.filter(|_| self.settled),
            input_tokens = self.input_tokens,
            output_tokens = self.output_tokens,
            ttft_ms = ttft,
            elapsed_ms = self.start.elapsed().as_millis() as u64,
            "request completed"
        );
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.record_span();
        if let Some(q) = self.queued.take() {
            q.dec();
        }
        let model = self.model.as_str();
        self.m.inflight.with_label_values(&[model]).dec();
        let (status, et) = match self.error_type {
            None => ("success", ""),
            Some(e) => ("error", e),
        };
        self.m
            .requests
            .with_label_values(&[model, self.endpoint, self.request_type, status, et])
            .inc();
        self.m
            .duration
            .with_label_values(&[model])
            .observe(self.start.elapsed().as_secs_f64());
        if self.output_tokens > 0 {
            self.m
                .osl
                .with_label_values(&[model])
                .observe(self.output_tokens as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_buckets;

    #[test]
    fn buckets_match_dynamo() {
        assert_eq!(
            log_buckets(0.001, 480.0, 18),
            vec![
                0.0, 0.0022, 0.0047, 0.01, 0.022, 0.047, 0.1, 0.22, 0.47, 1.0, 2.2, 4.7, 10.0,
                22.0, 48.0, 100.0, 220.0, 480.0
            ]
        );
        assert_eq!(
            log_buckets(0.001, 2.0, 13),
            vec![
                0.0, 0.0019, 0.0035, 0.0067, 0.013, 0.024, 0.045, 0.084, 0.16, 0.3, 0.56, 1.1, 2.0
            ]
        );
        assert_eq!(
            log_buckets(50.0, 128000.0, 12),
            vec![
                0.0, 100.0, 210.0, 430.0, 870.0, 1800.0, 3600.0, 7400.0, 15000.0, 31000.0, 63000.0,
                130000.0
            ]
        );
        assert_eq!(
            log_buckets(1.0, 512.0, 10),
            vec![0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 130.0, 260.0, 510.0]
        );
    }
}
