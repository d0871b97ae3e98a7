//! Process-wide logging and tracing for tandem binaries.
//!
//! `init` reads Dynamo's environment variables once at start-up and installs one global
//! `tracing` subscriber made of:
//! - a filter from `DYN_LOG` (an `EnvFilter` directive, default `info`), with Dynamo's noisy
//!   dependencies (h2, hyper, tonic, async-nats, …) held at `error` unless `DYN_LOG` names them;
//! - the OpenTelemetry layer ([`otel`]): every span gets W3C trace and span ids from the SDK
//!   tracer and, with `OTEL_EXPORT_ENABLED`, is exported in batches over OTLP gRPC to
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` under `OTEL_SERVICE_NAME` (default: the binary's name);
//! - the log output: with `DYN_LOGGING_JSONL` one JSON object per line on stderr ([`jsonl`],
//!   carrying the span's `trace_id` / `span_id`), otherwise human-readable lines;
//!   `DYN_LOG_USE_LOCAL_TZ` switches timestamps to local time. Lines are handed to a writer
//!   thread in batches ([`writer`]): a request's thread formats its line and never makes the
//!   write system call; nothing is dropped when stderr is slow (loggers wait instead).
//!
//! [`propagation`] moves trace context through HTTP and NATS headers and says whether a span
//! will be exported at all ([`propagation::is_exported`]), so work done only for a trace can
//! be skipped.

pub mod jsonl;
pub mod otel;
pub mod propagation;
pub mod writer;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{FilterExt, FilterFn, LevelFilter, Targets, filter_fn};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// Why logging could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid DYN_LOG filter {value:?}: {reason}")]
    Filter { value: String, reason: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("log writer thread not started: {0}")]
    Writer(String),
    #[error("OTLP exporter for {endpoint} not created: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("{var}={value:?}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
}

/// Crates whose own logs drown a service's at `info` or `debug`; held at `error` (as Dynamo
/// does) unless `DYN_LOG` mentions them.
const NOISY_TARGETS: [&str; 13] = [
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "axum",
    "tonic",
    "rustls",
    "async_nats",
    "tokenizers",
    "reqwest",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];

/// Logging and tracing settings, normally taken from the environment by
/// [`LogConfig::from_env`].
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub filter: String,
    pub jsonl: bool,
    pub local_tz: bool,
    /// Export spans over OTLP (`OTEL_EXPORT_ENABLED`).
    pub export: bool,
    /// Export log records over OTLP too: with `export`, unless `OTEL_EXPORT_LOGS_ENABLED` is
    /// set to a false value (Dynamo's switch).
    pub export_logs: bool,
    /// `service.name` of exported spans (`OTEL_SERVICE_NAME`).
    pub service_name: String,
}

impl LogConfig {
    /// Reads the environment; `default_service` names the process when `OTEL_SERVICE_NAME` is
    /// unset.
    pub fn from_env(default_service: &str) -> Self {
        Self {
            filter: std::env::var("DYN_LOG").unwrap_or_else(|_| "info".to_string()),
            jsonl: env_flag("DYN_LOGGING_JSONL"),
            local_tz: env_flag("DYN_LOG_USE_LOCAL_TZ"),
            export: env_flag("OTEL_EXPORT_ENABLED"),
            export_logs: env_flag("OTEL_EXPORT_ENABLED")
                && std::env::var("OTEL_EXPORT_LOGS_ENABLED")
                    .map_or(true, |_| env_flag("OTEL_EXPORT_LOGS_ENABLED")),
            service_name: std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| default_service.to_string()),
        }
    }
}

/// True for `1`, `true`, `yes`, `on` (any case), as Dynamo reads its boolean variables.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Kept alive by `main` for the life of the process; dropping it flushes queued spans to the
/// collector (bounded wait). Drop it on a multi-threaded tokio runtime or outside any runtime:
/// the flush blocks the calling thread while the exporter's connection runs on the runtime.
#[must_use = "dropping the guard ends telemetry export"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    logs: Option<opentelemetry_sdk::logs::SdkLoggerProvider>,
    /// Flushes the log lines still queued for stderr when dropped (last, after the exports).
    _stderr: writer::FlushGuard,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        otel::shutdown(&self.provider);
        if let Some(logs) = &self.logs {
            otel::shutdown_logs(logs);
        }
    }
}

/// Installs the global subscriber from the environment. Call inside the tokio runtime when
/// export may be enabled.
pub fn init(default_service: &str) -> Result<TelemetryGuard, TelemetryError> {
    init_with(LogConfig::from_env(default_service))
}

/// The `DYN_LOG` filter plus `error` for noisy crates the user did not mention.
fn env_filter(user: &str) -> Result<EnvFilter, TelemetryError> {
    let mut directives = user.to_string();
    for target in NOISY_TARGETS {
        let named = user.split(',').any(|d| {
            let d = d.trim();
            d == target
                || d.starts_with(&format!("{target}="))
                || d.starts_with(&format!("{target}::"))
        });
        if !named {
            directives.push_str(&format!(",{target}=error"));
        }
    }
    EnvFilter::try_new(&directives).map_err(|e| TelemetryError::Filter {
        value: user.to_string(),
        reason: e.to_string(),
    })
}

/// What the OpenTelemetry layer sees: everything the global filter lets through except the
/// noisy crates, whose spans include the exporter's own HTTP/2 calls (exporting those would
/// feed the exporter its own traffic). A `Targets` filter, so the decision is cached per
/// callsite instead of evaluated on every span and event.
fn otel_targets() -> Targets {
    NOISY_TARGETS
        .iter()
        .fold(Targets::new().with_default(LevelFilter::TRACE), |t, n| {
            t.with_target(*n, LevelFilter::OFF)
        })
}

/// What becomes part of a span: the spans themselves, and only the warnings and errors among
/// the log lines written inside them (a failed worker, a migration show on the trace). Every
/// other line would be copied into its span's event list whether or not the span is ever
/// exported; the lines reach a log store as log records instead (`OTEL_EXPORT_LOGS_ENABLED`).
/// Decided per callsite from its metadata, so it is cached, not evaluated per event.
fn spans_and_warnings() -> FilterFn {
    filter_fn(|m| m.is_span() || *m.level() <= tracing::Level::WARN)
}

pub fn init_with(config: LogConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = env_filter(&config.filter)?;
    // Read once: both exporters and the start-up line use it.
    let protocol = if config.export {
        Some(otel::Protocol::from_env()?)
    } else {
        None
    };
    let provider = otel::provider(&config.service_name, protocol)?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // The exporter's own HTTP/2 stack must never feed spans back into the exporter.
    // No per-poll work: contexts are not attached to the thread on every enter of a span
    // (parents come from the tracing span tree; log lines start a context on demand), and
    // busy/idle timings are off. Both cost a measurable share of a token's latency.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tandem"))
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(otel_targets().and(spans_and_warnings()));
    let logs = protocol
        .filter(|_| config.export_logs)
        .map(|p| otel::logger_provider(&config.service_name, p))
        .transpose()?;
    // Log records carry the ids of the span they were written in.
    let logs_layer = logs.as_ref().map(|p| {
        opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(p)
            .with_filter(otel_targets())
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(logs_layer);
    // Lines are written to stderr in batches by a thread of their own ([`writer`]): a
    // request neither waits for the write system call nor wakes a thread per line.
    let (stderr, stderr_guard) =
        writer::batched(std::io::stderr()).map_err(|e| TelemetryError::Writer(e.to_string()))?;
    let result = if config.jsonl {
        registry
            .with(jsonl::JsonlLayer::new(stderr, config.local_tz))
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(stderr)
                    .with_ansi(false),
            )
            .try_init()
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)?;
    propagation::EXPORTING.store(protocol.is_some(), std::sync::atomic::Ordering::Relaxed);
    if let Some(protocol) = protocol {
        tracing::info!(
            endpoint = %otel::traces_endpoint(protocol),
            logs_endpoint = config.export_logs.then(|| otel::logs_endpoint(protocol)),
            ?protocol,
            service_name = %config.service_name,
            "exporting traces over OTLP"
        );
    }
    Ok(TelemetryGuard {
        provider,
        logs,
        _stderr: stderr_guard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noisy_crates_are_held_at_error_unless_named() {
        let f = env_filter("info").unwrap().to_string();
        assert!(f.contains("h2=error") && f.contains("tonic=error"), "{f}");
        let f = env_filter("debug,async_nats=debug").unwrap().to_string();
        assert!(
            f.contains("async_nats=debug") && !f.contains("async_nats=error"),
            "{f}"
        );
        assert!(env_filter("info,=bad=").is_err());
    }
}
