//! Runtime settings with Dynamo's flag and environment names; binaries `#[command(flatten)]`
//! [`RuntimeConfig`] into their own CLI.

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
        default_value_t = 10
    )]
    pub lease_ttl_secs: u64,

    /// Port of the system status server (/health, /live, /metrics); unset or -1 disables it,
    /// 0 picks a free port.
    #[arg(
        long = "system-port",
        env = "DYN_SYSTEM_PORT",
        allow_hyphen_values = true
    )]
    pub system_port: Option<i32>,

    /// Address the system status server binds.
    #[arg(
        long = "system-host",
        env = "DYN_SYSTEM_HOST",
        default_value = "0.0.0.0"
    )]
    pub system_host: String,

    /// JSON list of endpoints that must serve before /health reports ready
    /// (default: every endpoint this process serves).
    #[arg(
        long = "system-use-endpoint-health-status",
        env = "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS"
    )]
    pub use_endpoint_health_status: Option<String>,

    /// Seconds without any frame or liveness ping after which a response stream is declared
    /// stalled.
    #[arg(
        long = "stream-stall-timeout-secs",
        env = "DYN_STREAM_STALL_TIMEOUT_SECS",
        default_value_t = 15.0
    )]
    pub stream_stall_timeout_secs: f64,

    /// How often a handler checks that its caller is still there; a caller that vanished is
    /// noticed within about this long.
    #[arg(
        long = "caller-probe-interval-secs",
        env = "DYN_CALLER_PROBE_INTERVAL_SECS",
        default_value_t = 1.0
    )]
    pub caller_probe_interval_secs: f64,

    /// Seconds a caller waits for an instance to acknowledge a request.
    #[arg(
        long = "request-ack-timeout-secs",
        env = "DYN_REQUEST_ACK_TIMEOUT_SECS",
        default_value_t = 5.0
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
            stream_stall_timeout_secs: 15.0,
            caller_probe_interval_secs: 1.0,
            request_ack_timeout_secs: 5.0,
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
        secs(self.stream_stall_timeout_secs, 15.0)
    }

    pub fn probe_interval(&self) -> Duration {
        secs(self.caller_probe_interval_secs, 1.0)
    }

    pub fn ack_timeout(&self) -> Duration {
        secs(self.request_ack_timeout_secs, 5.0)
    }

    pub fn lease_ttl(&self) -> i64 {
        self.lease_ttl_secs.clamp(2, 3600) as i64
    }

    /// Endpoint names that gate readiness, from `DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS`.
    pub fn required_endpoints(&self) -> Option<Vec<String>> {
        let raw = self.use_endpoint_health_status.as_deref()?;
        match serde_json::from_str::<Vec<String>>(raw) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => {
                tracing::warn!(
                    value = raw,
                    "ignoring DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS: not a JSON list of names"
                );
                None
            }
        }
    }
}

fn secs(v: f64, default: f64) -> Duration {
    if v.is_finite() && v > 0.0 {
        Duration::from_secs_f64(v)
    } else {
        Duration::from_secs_f64(default)
    }
}
