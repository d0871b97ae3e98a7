//! OpenTelemetry side of the subscriber: the tracer every span goes through and, when
//! `OTEL_EXPORT_ENABLED` is set, the batched OTLP export of spans and (unless
//! `OTEL_EXPORT_LOGS_ENABLED=false`) log records, over gRPC or HTTP/protobuf
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`).
//!
//! Spans always get real W3C ids from the SDK tracer, so log lines and propagated
//! `traceparent` headers carry the same ids whether or not they are exported. Export runs on
//! the SDK's batch thread: a request only appends its finished span to a bounded queue (full
//! queue = span dropped), so a slow or absent collector never costs request latency.

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Where spans and logs go over gRPC when no endpoint variable is set.
pub const DEFAULT_OTLP_ENDPOINT: &str = "http://localhost:4317";
/// The same over HTTP/protobuf (the signal's path is appended).
pub const DEFAULT_OTLP_HTTP_ENDPOINT: &str = "http://localhost:4318";

/// `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn from_env() -> Result<Self, crate::TelemetryError> {
        let var = "OTEL_EXPORTER_OTLP_PROTOCOL";
        match std::env::var(var).ok().as_deref().map(str::trim) {
            None | Some("") | Some("grpc") => Ok(Self::Grpc),
            Some("http/protobuf") => Ok(Self::HttpProtobuf),
            Some(other) => Err(crate::TelemetryError::Env {
                var,
                value: other.to_string(),
                reason: "expected grpc or http/protobuf".into(),
            }),
        }
    }
}

/// A signal's endpoint: its own variable, then the general one, then the default; over HTTP
/// the signal's path (`/v1/traces`, `/v1/logs`) is appended unless already there, as Dynamo
/// does. Logs never fall back to the traces variable.
fn signal_endpoint(own: &str, path: &str, protocol: Protocol) -> String {
    let base = [own, "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()));
    match protocol {
        Protocol::Grpc => base.unwrap_or_else(|| DEFAULT_OTLP_ENDPOINT.to_string()),
        Protocol::HttpProtobuf => {
            let base = base.unwrap_or_else(|| DEFAULT_OTLP_HTTP_ENDPOINT.to_string());
            let base = base.trim_end_matches('/');
            if base.ends_with(path) {
                base.to_string()
            } else {
                format!("{base}{path}")
            }
        }
    }
}

/// The traces endpoint (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then the general one).
pub fn traces_endpoint(protocol: Protocol) -> String {
    signal_endpoint("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/v1/traces", protocol)
}

/// The logs endpoint (`OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`, then the general one).
pub fn logs_endpoint(protocol: Protocol) -> String {
    signal_endpoint("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "/v1/logs", protocol)
}

/// How long shutdown waits for the last batch to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Head sampling from OpenTelemetry's variables, refusing values it does not know (the SDK
/// alone would fall back to sampling everything with a warning): `OTEL_TRACES_SAMPLER` =
/// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` (the default),
/// `parentbased_always_off`, `parentbased_traceidratio`, with `OTEL_TRACES_SAMPLER_ARG` the
/// ratio (0–1, default 1). Dynamo's `OTEL_TRACES_SAMPLE_RATIO` alone means
/// `parentbased_traceidratio` with that ratio. Unsampled spans still have ids: log lines
/// carry them.
pub fn sampler_from_env(
    var: impl Fn(&str) -> Option<String>,
) -> Result<Sampler, crate::TelemetryError> {
    let bad = |var: &'static str, value: &str, reason: &str| crate::TelemetryError::Env {
        var,
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let ratio = |name: &'static str| -> Result<f64, crate::TelemetryError> {
        match var(name).filter(|v| !v.trim().is_empty()) {
            None => Ok(1.0),
            Some(v) => match v.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(bad(name, &v, "expected a ratio between 0 and 1")),
            },
        }
    };
    let sampler = var("OTEL_TRACES_SAMPLER").filter(|v| !v.trim().is_empty());
    let Some(name) = sampler else {
        return Ok(match var("OTEL_TRACES_SAMPLE_RATIO") {
            Some(_) => parent_based(Sampler::TraceIdRatioBased(ratio(
                "OTEL_TRACES_SAMPLE_RATIO",
            )?)),
            None => parent_based(Sampler::AlwaysOn),
        });
    };
    Ok(match name.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio("OTEL_TRACES_SAMPLER_ARG")?),
        "parentbased_always_on" => parent_based(Sampler::AlwaysOn),
        "parentbased_always_off" => parent_based(Sampler::AlwaysOff),
        "parentbased_traceidratio" => parent_based(Sampler::TraceIdRatioBased(ratio(
            "OTEL_TRACES_SAMPLER_ARG",
        )?)),
        other => {
            return Err(bad(
                "OTEL_TRACES_SAMPLER",
                other,
                "expected always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio",
            ));
        }
    })
}

fn parent_based(root: Sampler) -> Sampler {
    Sampler::ParentBased(Box::new(root))
}

/// Builds the tracer provider. With `export` the OTLP exporter is created here, so this must
/// run inside a tokio runtime (tonic's channel spawns its connection task on it).
pub(crate) fn provider(
    service_name: &str,
    export: Option<Protocol>,
) -> Result<SdkTracerProvider, crate::TelemetryError> {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource(service_name))
        .with_sampler(sampler_from_env(|k| std::env::var(k).ok())?);
    if let Some(protocol) = export {
        let endpoint = traces_endpoint(protocol);
        let built = match protocol {
            Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build(),
            Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint.clone())
                .build(),
        };
        let exporter = built.map_err(|e| exporter_error(&endpoint, e))?;
        builder = builder.with_batch_exporter(ReportingExporter::new(exporter, endpoint));
    }
    Ok(builder.build())
}

/// The log-record provider for OTLP log export; each record carries the trace and span ids
/// of the span it was written in (sampled or not).
pub(crate) fn logger_provider(
    service_name: &str,
    protocol: Protocol,
) -> Result<SdkLoggerProvider, crate::TelemetryError> {
    let endpoint = logs_endpoint(protocol);
    let built = match protocol {
        Protocol::Grpc => opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::LogExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .build(),
    };
    let exporter = built.map_err(|e| exporter_error(&endpoint, e))?;
    Ok(SdkLoggerProvider::builder()
        .with_resource(resource(service_name))
        .with_batch_exporter(exporter)
        .build())
}

/// What every exported span and log record says about its process.
fn resource(service_name: &str) -> Resource {
    Resource::builder()
        .with_service_name(service_name.to_string())
        .build()
}

fn exporter_error(endpoint: &str, e: impl std::fmt::Display) -> crate::TelemetryError {
    crate::TelemetryError::Exporter {
        endpoint: endpoint.to_string(),
        reason: e.to_string(),
    }
}

/// Flushes queued log records at shutdown (bounded).
pub(crate) fn shutdown_logs(provider: &SdkLoggerProvider) {
    if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
        tracing::warn!(error = %e, "log export did not flush at shutdown");
    }
}

/// Flushes what is queued and stops the batch thread; bounded so that an unreachable
/// collector cannot hold up process exit.
pub(crate) fn shutdown(provider: &SdkTracerProvider) {
    if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
        tracing::warn!(error = %e, "trace export did not flush at shutdown");
    }
}

/// Wraps the OTLP exporter so that a failing collector is reported once (a warning when export
/// starts failing, an info line when it works again) instead of once per batch.
#[derive(Debug)]
pub(crate) struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
    failures: AtomicU64,
}

impl<E> ReportingExporter<E> {
    pub(crate) fn new(inner: E, endpoint: String) -> Self {
        Self {
            inner,
            endpoint,
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        }
    }

    fn report(&self, result: &OTelSdkResult, spans: usize) {
        match result {
            Err(e) => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        error = %e,
                        "OTLP trace export failed; spans are dropped until the collector is reachable (reported once)"
                    );
                } else {
                    tracing::debug!(endpoint = %self.endpoint, error = %e, spans, failures, "OTLP trace export still failing");
                }
            }
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "OTLP trace export recovered");
                }
            }
        }
    }
}

impl<E: SpanExporter> SpanExporter for ReportingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        self.report(&result, spans);
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_from_the_environment_and_bad_values_refused() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let name = |s: Sampler| format!("{s:?}");
        assert!(name(sampler_from_env(env(&[])).unwrap()).starts_with("ParentBased(AlwaysOn"));
        let r = sampler_from_env(env(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ]))
        .unwrap();
        assert!(name(r).contains("TraceIdRatioBased(0.0)"));
        let dynamo = sampler_from_env(env(&[("OTEL_TRACES_SAMPLE_RATIO", "0.25")])).unwrap();
        assert!(name(dynamo).contains("ParentBased(TraceIdRatioBased(0.25)"));
        assert!(matches!(
            sampler_from_env(env(&[("OTEL_TRACES_SAMPLER", "sometimes")])),
            Err(crate::TelemetryError::Env {
                var: "OTEL_TRACES_SAMPLER",
                ..
            })
        ));
        assert!(matches!(
            sampler_from_env(env(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.5")
            ])),
            Err(crate::TelemetryError::Env {
                var: "OTEL_TRACES_SAMPLER_ARG",
                ..
            })
        ));
    }
    use opentelemetry_sdk::error::OTelSdkError;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// A collector that is down until `up` is set.
    #[derive(Debug, Default)]
    struct Flaky {
        up: Arc<AtomicBool>,
    }
    impl SpanExporter for Flaky {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            if self.up.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err(OTelSdkError::InternalFailure("connection refused".into()))
            }
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<(tracing::Level, String)>>>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Lines {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            let mut msg = String::new();
            struct V<'a>(&'a mut String);
            impl tracing::field::Visit for V<'_> {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        *self.0 = format!("{v:?}");
                    }
                }
            }
            e.record(&mut V(&mut msg));
            self.0.lock().unwrap().push((*e.metadata().level(), msg));
        }
    }

    #[test]
    fn a_failing_collector_is_reported_once_and_its_recovery_once() {
        let lines = Lines::default();
        let up = Arc::new(AtomicBool::new(false));
        let exporter = ReportingExporter::new(Flaky { up: up.clone() }, "http://x:4317".into());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let subscriber = tracing_subscriber::registry().with(lines.clone());
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..5 {
                assert!(rt.block_on(exporter.export(vec![])).is_err());
            }
            up.store(true, Ordering::Relaxed);
            for _ in 0..3 {
                assert!(rt.block_on(exporter.export(vec![])).is_ok());
            }
            up.store(false, Ordering::Relaxed);
            assert!(rt.block_on(exporter.export(vec![])).is_err());
        });
        let lines = lines.0.lock().unwrap();
        let count = |level| lines.iter().filter(|(l, _)| *l == level).count();
        assert_eq!(count(tracing::Level::WARN), 2, "{lines:?}");
        assert_eq!(count(tracing::Level::DEBUG), 4, "{lines:?}");
        assert_eq!(count(tracing::Level::INFO), 1, "{lines:?}");
        assert!(lines[0].1.contains("OTLP trace export failed"));
    }
}
