//! Process-wide logging for tandem binaries.
//!
//! `init` reads Dynamo's environment variables once at start-up and installs one global
//! `tracing` subscriber:
//! - `DYN_LOG`: an `EnvFilter` directive (default `info`), e.g. `info,tandem_runtime=debug`;
//! - `DYN_LOGGING_JSONL`: when true, every event becomes one JSON object per line on stderr
//!   (see [`jsonl`]); otherwise human-readable lines;
//! - `DYN_LOG_USE_LOCAL_TZ`: timestamps in local time instead of UTC.
//!
//! Trace export (OTLP) will be another layer on the same registry; the JSONL layer already
//! carries span fields so that request ids show up on every line inside a request's span.

pub mod jsonl;

use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Why logging could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid DYN_LOG filter {value:?}: {reason}")]
    Filter { value: String, reason: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Logging settings, normally taken from the environment by [`LogConfig::from_env`].
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub filter: String,
    pub jsonl: bool,
    pub local_tz: bool,
}

impl LogConfig {
    pub fn from_env() -> Self {
        Self {
            filter: std::env::var("DYN_LOG").unwrap_or_else(|_| "info".to_string()),
            jsonl: env_flag("DYN_LOGGING_JSONL"),
            local_tz: env_flag("DYN_LOG_USE_LOCAL_TZ"),
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

/// Kept alive by `main` for the life of the process; dropping it flushes exporters.
#[must_use = "dropping the guard ends telemetry export"]
pub struct TelemetryGuard {
    _private: (),
}

/// Installs the global subscriber from the environment.
pub fn init() -> Result<TelemetryGuard, TelemetryError> {
    init_with(LogConfig::from_env())
}

pub fn init_with(config: LogConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&config.filter).map_err(|e| TelemetryError::Filter {
        value: config.filter.clone(),
        reason: e.to_string(),
    })?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = if config.jsonl {
        registry
            .with(jsonl::JsonlLayer::new(std::io::stderr, config.local_tz))
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false),
            )
            .try_init()
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { _private: () })
}
