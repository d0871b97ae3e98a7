//! Runtime settings with Dynamo's flag and environment names; binaries `#[command(flatten)]`
//! [`RuntimeConfig`] into their own CLI. Every value is checked when it is parsed, so a bad
//! flag or environment value stops the process at start-up with an error naming the flag,
//! instead of turning into a default somewhere later.

use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeConfig {
    /// Dynamo namespace that groups components.
    #[arg(long, env = "DYN_NAMESPACE", default_value = "dynamo")]
    pub namespace: String,

    /// NATS server URL(s), comma separated.
    #[arg(
        long = "nats-server",
        env = "NATS_SERVER",
        default_value = "nats://localhost:4222"
    )]
    pub nats_server: String,

    /// etcd endpoints, comma separated.
    #[arg(
        long = "etcd-endpoints",
        env = "ETCD_ENDPOINTS",
        default_value = "http://localhost:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// TTL of the process's primary etcd lease: how long a dead process stays discoverable.
    #[arg(
        long = "lease-ttl-secs",
        env = "DYN_LEASE_TTL_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(2..=3600)
    )]
    pub lease_ttl_secs: u64,

    /// Port of the system status server (/health, /live, /metrics); unset or -1 disables it,
    /// 0 picks a free port.
    #[arg(
        long = "system-port",
        env = "DYN_SYSTEM_PORT",
        allow_hyphen_values = true,
        value_parser = parse_system_port
    )]
    pub system_port: Option<i32>,

    /// Address the system status server binds.
    #[arg(
        long = "system-host",
        env = "DYN_SYSTEM_HOST",
        default_value = "0.0.0.0"
    )]
    pub system_host: String,

    /// Path of the readiness route on the system status server.
    #[arg(
        long = "system-health-path",
        env = "DYN_SYSTEM_HEALTH_PATH",
        default_value = "/health",
        value_parser = parse_route
    )]
    pub system_health_path: String,

    /// Path of the liveness route (same answer as readiness, as in Dynamo).
    #[arg(
        long = "system-live-path",
        env = "DYN_SYSTEM_LIVE_PATH",
        default_value = "/live",
        value_parser = parse_route
    )]
    pub system_live_path: String,

    /// What an endpoint reports from when it is declared until it serves: `notready`
    /// (Dynamo's default) or `ready`. With `ready`, a process with no endpoint yet is ready.
    #[arg(
        long = "system-starting-health-status",
        env = "DYN_SYSTEM_STARTING_HEALTH_STATUS",
        value_enum,
        default_value = "notready"
    )]
    pub starting_health_status: HealthStatus,

    /// JSON list of endpoints that must serve before /health reports ready
    /// (default: every endpoint this process serves).
    #[arg(
        long = "system-use-endpoint-health-status",
        env = "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS",
        value_parser = parse_endpoint_names
    )]
    pub use_endpoint_health_status: Option<EndpointNames>,

    /// Seconds without any frame or liveness ping after which a response stream is declared
    /// stalled.
    #[arg(
        long = "stream-stall-timeout-secs",
        env = "DYN_STREAM_STALL_TIMEOUT_SECS",
        default_value_t = 15.0
    ,
        value_parser = positive_secs
    )]
    pub stream_stall_timeout_secs: f64,

    /// How often a handler checks that its caller is still there; a caller that vanished is
    /// noticed within about this long.
    #[arg(
        long = "caller-probe-interval-secs",
        env = "DYN_CALLER_PROBE_INTERVAL_SECS",
        default_value_t = 1.0
    ,
        value_parser = positive_secs
    )]
    pub caller_probe_interval_secs: f64,

    /// On SIGTERM, how long in-flight requests may run to their end after the process has
    /// stopped taking new ones; those still running then are handed back to their callers as
    /// `unavailable` (a frontend with `--migration-limit` continues them on another worker).
    #[arg(
        long = "graceful-shutdown-timeout-secs",
        env = "DYN_GRACEFUL_SHUTDOWN_TIMEOUT_SECS",
        default_value_t = 30.0,
        value_parser = positive_secs
    )]
    pub graceful_shutdown_timeout_secs: f64,

    /// Seconds a caller waits for an instance to acknowledge a request.
    #[arg(
        long = "request-ack-timeout-secs",
        env = "DYN_REQUEST_ACK_TIMEOUT_SECS",
        default_value_t = 5.0
    ,
        value_parser = positive_secs
    )]
    pub request_ack_timeout_secs: f64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            namespace: "dynamo".into(),
            nats_server: "nats://localhost:4222".into(),
            etcd_endpoints: vec!["http://localhost:2379".into()],
            lease_ttl_secs: 10,
            system_port: None,
            system_host: "0.0.0.0".into(),
            use_endpoint_health_status: None,
            system_health_path: "/health".into(),
            system_live_path: "/live".into(),
            starting_health_status: HealthStatus::Notready,
            stream_stall_timeout_secs: 15.0,
            caller_probe_interval_secs: 1.0,
            request_ack_timeout_secs: 5.0,
            graceful_shutdown_timeout_secs: 30.0,
        }
    }
}

impl RuntimeConfig {
    pub fn system_port(&self) -> Option<u16> {
        match self.system_port {
            Some(p) if (0..=u16::MAX as i32).contains(&p) => Some(p as u16),
            _ => None,
        }
    }

    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.stream_stall_timeout_secs)
    }

    pub fn graceful_shutdown_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.graceful_shutdown_timeout_secs)
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_secs_f64(self.caller_probe_interval_secs)
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_ack_timeout_secs)
    }

    pub fn lease_ttl(&self) -> i64 {
        self.lease_ttl_secs as i64
    }

    /// Endpoint names that gate readiness, from `DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS`.
    pub fn required_endpoints(&self) -> Option<Vec<String>> {
        self.use_endpoint_health_status.clone().map(|n| n.0)
    }
}

/// A non-empty JSON list of endpoint names, as `DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointNames(pub Vec<String>);

fn parse_endpoint_names(s: &str) -> Result<EndpointNames, String> {
    match serde_json::from_str::<Vec<String>>(s) {
        Ok(v) if !v.is_empty() => Ok(EndpointNames(v)),
        Ok(_) => Err("the list is empty".into()),
        Err(e) => Err(format!("expected a JSON list of endpoint names: {e}")),
    }
}

/// `DYN_SYSTEM_STARTING_HEALTH_STATUS`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HealthStatus {
    Ready,
    Notready,
}

/// An HTTP route: starts with `/`, has no spaces.
fn parse_route(s: &str) -> Result<String, String> {
    if s.starts_with('/') && s.len() > 1 && !s.contains(char::is_whitespace) {
        Ok(s.to_string())
    } else {
        Err(format!("`{s}` is not a route like /health"))
    }
}

/// -1 (off, Dynamo's convention) or a port; 0 picks a free one.
fn parse_system_port(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(p) if p == -1 || (0..=u16::MAX as i32).contains(&p) => Ok(p),
        Ok(p) => Err(format!("{p} is neither -1 nor a port (0-65535)")),
        Err(e) => Err(e.to_string()),
    }
}

/// A year: far beyond any sensible timeout, far below what `Duration` can hold.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// Seconds: above zero, at most [`MAX_SECS`].
pub fn positive_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= MAX_SECS => Ok(v),
        Ok(v) => Err(format!("{v} is not a number of seconds in (0, {MAX_SECS}]")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        rt: RuntimeConfig,
    }

    #[test]
    fn bad_values_are_errors_naming_the_flag() {
        let ok = Cli::try_parse_from([
            "x",
            "--system-port",
            "-1",
            "--stream-stall-timeout-secs",
            "0.5",
            "--system-use-endpoint-health-status",
            r#"["generate"]"#,
        ])
        .unwrap();
        assert_eq!(ok.rt.system_port(), None);
        assert_eq!(ok.rt.stall_timeout(), Duration::from_millis(500));
        assert_eq!(
            ok.rt.required_endpoints(),
            Some(vec!["generate".to_string()])
        );
        for (flag, value) in [
            ("--system-port", "70000"),
            ("--system-port", "-2"),
            ("--stream-stall-timeout-secs", "abc"),
            ("--caller-probe-interval-secs", "0"),
            ("--request-ack-timeout-secs", "inf"),
            ("--request-ack-timeout-secs", "1e300"),
            ("--lease-ttl-secs", "1"),
            ("--system-use-endpoint-health-status", "generate"),
            ("--system-use-endpoint-health-status", "[]"),
        ] {
            let err = Cli::try_parse_from(["x", flag, value])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(flag), "{flag}={value}: {err}");
        }
    }
}
